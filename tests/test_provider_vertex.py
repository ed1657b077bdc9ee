"""``type: vertex`` through the gateway: ADC against a local token endpoint that verifies the JWT, the Gemini
translation on Vertex paths, and Vertex's OpenAI-compatible endpoint, with the openai SDK as the client."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import anyio
import httpx
import openai
import pytest

from at_gateway.config import build_config
from at_gateway.errors import StepFailed
from at_gateway.http.pool import UpstreamClient
from at_gateway.providers.vertex import TokenSource, VertexProvider
from tests.conftest import GATEWAY_KEY, base_config, run_gateway
from tests.mock_google import (
    GeminiMock,
    TokenServer,
    call,
    make_service_account,
    response,
    sse,
    text,
    usage,
)
from tests.mock_upstream import MockUpstream, Reply, chat_completion, stream_of, wait_until

MODEL = "gemini-2.5-flash"
OPENAI_MODEL = "google/gemini-2.0-flash-001"
PREFIX = "/v1/projects/test-project/locations/europe-west4"
USER = {"role": "user", "content": "What is the weather in Paris?"}
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="


@pytest.fixture(autouse=True)
def clean_google_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No real credentials on this machine may leak into a test, and none may be found by accident."""
    for var in ("GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT", "GCLOUD_PROJECT", "CLOUDSDK_CORE_PROJECT",
                "GCE_METADATA_HOST"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "gcloud").mkdir()
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))


@pytest.fixture
def tokens() -> Iterator[TokenServer]:
    server = TokenServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def vertex(upstream: MockUpstream, tokens: TokenServer) -> Iterator[GeminiMock]:
    mock = GeminiMock(upstream, vertex=True, tokens=tokens.issued)
    yield mock
    assert mock.problems == [], "the gateway sent requests Vertex AI would refuse"
    assert tokens.problems == [], "the token endpoint refused a JWT"


def service_account(tmp_path: Path, tokens: TokenServer, token_uri: str | None = None, name: str = "sa.json",
                    register: bool = True) -> Path:
    info, public_key = make_service_account(token_uri)
    if register:
        tokens.public_keys[info["client_email"]] = public_key
    path = tmp_path / name
    path.write_text(json.dumps(info))
    return path


def config(mock: GeminiMock, **provider: Any) -> dict[str, Any]:
    routes = [
        {"name": "v", "steps": [{"provider": "vx", "model": MODEL}]},
        {"name": "vo", "steps": [{"provider": "vx", "model": OPENAI_MODEL}]},
        {"name": "v-then-echo", "steps": [{"provider": "vx", "model": MODEL}, {"provider": "echo", "model": "e"}]},
    ]
    cfg = base_config(mock.url, routes)
    cfg["providers"].append({"name": "vx", "type": "vertex", "base_url": mock.url, "location": "europe-west4",
                             **provider})
    return cfg


def sa_config(mock: GeminiMock, tmp_path: Path, tokens: TokenServer, **provider: Any) -> dict[str, Any]:
    return config(mock, project="test-project", credentials_file=str(service_account(tmp_path, tokens)),
                  token_url=tokens.url, **provider)


def sdk(gw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=GATEWAY_KEY, max_retries=0, timeout=20)


def token_forms(tokens: TokenServer) -> list[dict[str, str]]:
    return [{k: v[0] for k, v in parse_qs(body.decode()).items()} for m, path, _, body in tokens.requests
            if m == "POST"]


# ---------------------------------------------------------------------------
# Authentication
# ---------------------------------------------------------------------------

def test_service_account_jwt_is_verified_and_the_token_reused(vertex: GeminiMock, tokens: TokenServer,
                                                              tmp_path: Path) -> None:
    answer = Reply(body=response(text("Sunny."), meta=usage()))
    vertex.on(MODEL, answer, answer, sse(response(text("Sun"), finish=None), response(text("ny."), meta=usage(4, 2))))
    with run_gateway(sa_config(vertex, tmp_path, tokens)) as gw:
        client = sdk(gw)
        for _ in range(2):
            assert client.chat.completions.create(model="v", messages=[USER]).choices[0].message.content == "Sunny."
        chunks = list(client.chat.completions.create(model="v", stream=True, messages=[USER],
                                                     stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Sunny."
        assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 6
    assert tokens.token_requests == 1
    (form,) = token_forms(tokens)
    assert form["grant_type"] == "urn:ietf:params:oauth:grant-type:jwt-bearer" and form["assertion"].count(".") == 2
    paths = [c.received.path for c in vertex.calls]
    assert paths == [f"{PREFIX}/publishers/google/models/{MODEL}:generateContent"] * 2 + [
        f"{PREFIX}/publishers/google/models/{MODEL}:streamGenerateContent?alt=sse"]
    assert {c.received.headers["authorization"] for c in vertex.calls} == {"Bearer ya29.mock-access-token-1"}
    assert all("x-goog-api-key" not in c.received.headers for c in vertex.calls)


def test_concurrent_requests_trigger_one_refresh(vertex: GeminiMock, tokens: TokenServer, tmp_path: Path) -> None:
    vertex.on(MODEL, Reply(body=response(text("ok"), meta=usage())))
    tokens.gate = threading.Event()
    with run_gateway(sa_config(vertex, tmp_path, tokens)) as gw:
        results: list[str] = []

        def one() -> None:
            r = sdk(gw).chat.completions.create(model="v", messages=[USER])
            results.append(r.choices[0].message.content or "")

        threads = [threading.Thread(target=one) for _ in range(5)]
        for t in threads:
            t.start()
        source = gw.gateway.providers["vx"].tokens
        # One request is at the token endpoint, the four others queue on the lock behind it.
        assert wait_until(lambda: tokens.waiting == 1 and source._lock.statistics().tasks_waiting == 4, 10)
        tokens.gate.set()
        for t in threads:
            t.join(10)
        assert results == ["ok"] * 5
        assert tokens.token_requests == 1 and source.fetches == 1
        assert len({c.received.headers["authorization"] for c in vertex.calls}) == 1


def test_token_refreshed_shortly_before_expiry(tokens: TokenServer, tmp_path: Path) -> None:
    tokens.expires_in = 200  # refreshed 50 s before it expires
    path = service_account(tmp_path, tokens)
    offset = [0.0]

    async def main() -> list[str]:
        client = UpstreamClient()
        source = TokenSource(client, credentials_file=str(path), token_url=tokens.url,
                             clock=lambda: time.time() + offset[0])
        got = [await source.token()]
        offset[0] = 149
        got.append(await source.token())
        offset[0] = 151
        got.append(await source.token())
        got.append(await source.token())
        source.invalidate(got[-1])
        got.append(await source.token())
        await client.aclose()
        return got

    got = anyio.run(main)
    assert got == ["ya29.mock-access-token-1", "ya29.mock-access-token-1", "ya29.mock-access-token-2",
                   "ya29.mock-access-token-2", "ya29.mock-access-token-3"]
    assert tokens.token_requests == 3 and tokens.problems == []


async def _until(cond: Any, timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not cond():
            await anyio.sleep(0.005)


def test_a_failed_refresh_is_shared_and_a_cancelled_one_leaves_no_stale_error(tokens: TokenServer,
                                                                               tmp_path: Path) -> None:
    info, public_key = make_service_account()
    path = tmp_path / "sa.json"
    path.write_text(json.dumps(info))  # its public key is not registered yet: the endpoint refuses the JWT
    tokens.gate = threading.Event()

    async def main() -> None:
        client = UpstreamClient()
        source = TokenSource(client, credentials_file=str(path), token_url=tokens.url)
        errors: list[str] = []

        async def failing() -> None:
            with pytest.raises(StepFailed) as exc:
                await source.token()
            errors.append(exc.value.message)

        # Five at once against a refusing endpoint: one request reaches it, the others share its error.
        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(failing)
            await _until(lambda: tokens.waiting == 1 and source._lock.statistics().tasks_waiting == 4)
            tokens.gate.set()
        assert len(errors) == 5 and len(set(errors)) == 1 and "invalid_grant" in errors[0]
        assert tokens.token_requests == 1

        # The key is fixed. A refresh whose request gives up midway must not hand that old error to
        # the request queued behind it: that one fetches for itself.
        tokens.public_keys[info["client_email"]] = public_key
        tokens.gate = threading.Event()
        got: list[str] = []
        scope = anyio.CancelScope()

        async def gives_up() -> None:
            with scope:
                await source.token()

        async def queued() -> None:
            got.append(await source.token())

        async with anyio.create_task_group() as tg:
            tg.start_soon(gives_up)
            await _until(lambda: tokens.waiting == 2)
            tg.start_soon(queued)
            await _until(lambda: source._lock.statistics().tasks_waiting == 1)
            scope.cancel()
            await _until(lambda: tokens.waiting == 3)
            tokens.gate.set()
        assert len(got) == 1 and got[0].startswith("ya29.mock-access-token-")
        await client.aclose()

    anyio.run(main)
    assert tokens.token_requests == 3


def test_a_401_drops_the_cached_token(vertex: GeminiMock, tokens: TokenServer, tmp_path: Path) -> None:
    vertex.on(MODEL, Reply(body=response(text("ok"), meta=usage())))
    with run_gateway(sa_config(vertex, tmp_path, tokens)) as gw:
        client = sdk(gw)
        client.chat.completions.create(model="v", messages=[USER])
        tokens.issued.discard("ya29.mock-access-token-1")  # revoked behind our back
        raw = client.chat.completions.with_raw_response.create(model="v-then-echo", messages=[USER])
        assert raw.headers["x-gateway-provider"] == "echo"
        assert client.chat.completions.create(model="v", messages=[USER]).choices[0].message.content == "ok"
    assert tokens.token_requests == 2
    assert vertex.calls[-1].received.headers["authorization"] == "Bearer ya29.mock-access-token-2"


def test_google_application_credentials_with_token_uri_and_project_from_file(
        vertex: GeminiMock, tokens: TokenServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(service_account(tmp_path, tokens, token_uri=tokens.url)))
    vertex.on(MODEL, Reply(body=response(text("ok"), meta=usage())))
    with run_gateway(config(vertex)) as gw:
        assert sdk(gw).chat.completions.create(model="v", messages=[USER]).choices[0].message.content == "ok"
    assert vertex.calls[-1].received.path.startswith(PREFIX + "/")
    assert tokens.token_requests == 1


def test_authorized_user_is_refreshed_with_its_refresh_token(vertex: GeminiMock, tokens: TokenServer,
                                                             tmp_path: Path) -> None:
    tokens.refresh["1//refresh-token-xyz"] = ("client-id.apps.googleusercontent.com", "client-secret-abc")
    path = tmp_path / "adc.json"
    path.write_text(json.dumps({"type": "authorized_user", "client_id": "client-id.apps.googleusercontent.com",
                                "client_secret": "client-secret-abc", "refresh_token": "1//refresh-token-xyz",
                                "quota_project_id": "billing-project"}))
    vertex.on(MODEL, Reply(body=response(text("ok"), meta=usage())))
    vertex.on(OPENAI_MODEL, Reply(body=chat_completion("ok", model=OPENAI_MODEL)))
    with run_gateway(config(vertex, project="test-project", credentials_file=str(path), token_url=tokens.url)) as gw:
        sdk(gw).chat.completions.create(model="v", messages=[USER])
        sdk(gw).chat.completions.create(model="v", messages=[USER])
        sdk(gw).chat.completions.create(model="vo", messages=[USER])
    (form,) = token_forms(tokens)
    assert form == {"grant_type": "refresh_token", "client_id": "client-id.apps.googleusercontent.com",
                    "client_secret": "client-secret-abc", "refresh_token": "1//refresh-token-xyz"}
    assert vertex.calls[-1].received.headers["x-goog-user-project"] == "billing-project"
    assert vertex.openai_calls[-1].headers["x-goog-user-project"] == "billing-project"


def test_well_known_gcloud_file_is_found(vertex: GeminiMock, tokens: TokenServer, tmp_path: Path) -> None:
    tokens.refresh["rt"] = ("cid", "secret")
    (tmp_path / "gcloud" / "application_default_credentials.json").write_text(json.dumps(
        {"type": "authorized_user", "client_id": "cid", "client_secret": "secret", "refresh_token": "rt"}))
    vertex.on(MODEL, Reply(body=response(text("ok"), meta=usage())))
    with run_gateway(config(vertex, project="test-project", token_url=tokens.url)) as gw:
        assert sdk(gw).chat.completions.create(model="v", messages=[USER]).choices[0].message.content == "ok"
    assert tokens.token_requests == 1


def test_metadata_server(vertex: GeminiMock, tokens: TokenServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GCE_METADATA_HOST", tokens.host)
    vertex.on(MODEL, Reply(body=response(text("ok"), meta=usage())))
    with run_gateway(config(vertex)) as gw:
        for _ in range(2):
            assert sdk(gw).chat.completions.create(model="v", messages=[USER]).choices[0].message.content == "ok"
    assert vertex.calls[-1].received.path.startswith("/v1/projects/metadata-project/locations/europe-west4/")
    gets = [(path, h.get("metadata-flavor")) for m, path, h, _ in tokens.requests]
    assert gets == [("/computeMetadata/v1/instance/service-accounts/default/token", "Google"),
                    ("/computeMetadata/v1/project/project-id", "Google")]


def test_bad_credentials_fail_the_step_clearly_without_secrets(vertex: GeminiMock, tokens: TokenServer,
                                                               tmp_path: Path) -> None:
    wrong = service_account(tmp_path, tokens, name="wrong.json", register=False)
    tokens.public_keys["gateway@test-project.iam.gserviceaccount.com"] = make_service_account()[1]
    cfg = config(vertex, project="test-project", credentials_file=str(wrong), token_url=tokens.url)
    with run_gateway(cfg) as gw:
        r = httpx.post(gw.url + "/v1/chat/completions", headers={"x-api-key": GATEWAY_KEY},
                       json={"model": "v", "messages": [USER]})
        assert r.status_code == 502
        msg = r.json()["error"]["attempts"][0]["error"]
        assert "Vertex credentials" in msg and "invalid_grant" in msg and "Invalid JWT Signature" in msg
        assert "PRIVATE KEY" not in r.text and "PRIVATE KEY" not in gw.logs.getvalue()
        raw = sdk(gw).chat.completions.with_raw_response.create(model="v-then-echo", messages=[USER])
        assert raw.headers["x-gateway-attempts"] == "2" and raw.headers["x-gateway-provider"] == "echo"
    tokens.problems.clear()
    assert vertex.calls == []


def test_missing_credentials_file_is_a_clear_error(vertex: GeminiMock, tmp_path: Path) -> None:
    with run_gateway(config(vertex, project="p", credentials_file=str(tmp_path / "nope.json"))) as gw:
        r = httpx.post(gw.url + "/v1/chat/completions", headers={"x-api-key": GATEWAY_KEY},
                       json={"model": "v", "messages": [USER]})
    assert r.status_code == 502 and "does not exist" in r.json()["error"]["attempts"][0]["error"]


# ---------------------------------------------------------------------------
# Gemini translation on Vertex
# ---------------------------------------------------------------------------

WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
    "additionalProperties": False}}}


def test_two_turn_tool_call_in_a_stream(vertex: GeminiMock, tokens: TokenServer, tmp_path: Path) -> None:
    vertex.on(MODEL, sse(response(call("get_weather", {"city": "Paris"}), call("get_weather", {"city": "Nice"}),
                                  meta=usage(20, 6))),
              sse(response(text("Both sunny."), meta=usage(40, 3))))
    with run_gateway(sa_config(vertex, tmp_path, tokens)) as gw:
        client = sdk(gw)
        chunks = list(client.chat.completions.create(model="v", stream=True, messages=[USER], tools=[WEATHER_TOOL]))
        deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
        assert [(d.index, d.function.name, d.function.arguments) for d in deltas] == [
            (0, "get_weather", '{"city":"Paris"}'), (1, "get_weather", '{"city":"Nice"}')]
        assert all(d.id and d.id.startswith("call_") for d in deltas) and deltas[0].id != deltas[1].id
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        history = [USER, {"role": "assistant", "tool_calls": [
            {"id": d.id, "type": "function", "function": {"name": d.function.name, "arguments": d.function.arguments}}
            for d in deltas]}]
        history += [{"role": "tool", "tool_call_id": d.id, "content": "sunny"} for d in reversed(deltas)]
        final = list(client.chat.completions.create(model="v", stream=True, messages=history, tools=[WEATHER_TOOL]))
        assert "".join(c.choices[0].delta.content or "" for c in final if c.choices) == "Both sunny."
    # Vertex gets no ids: calls and responses pair up by name and order.
    assert vertex.calls[-1].body["contents"][1:] == [
        {"role": "model", "parts": [{"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}},
                                    {"functionCall": {"name": "get_weather", "args": {"city": "Nice"}}}]},
        {"role": "user", "parts": [{"functionResponse": {"name": "get_weather", "response": {"output": "sunny"}}}] * 2},
    ]


def test_image_and_json_mode(vertex: GeminiMock, tokens: TokenServer, tmp_path: Path) -> None:
    vertex.on(MODEL, Reply(body=response(text('{"colour": "red"}'), meta=usage())))
    with run_gateway(sa_config(vertex, tmp_path, tokens)) as gw:
        c = sdk(gw).chat.completions.create(model="v", response_format={"type": "json_object"}, messages=[
            {"role": "user", "content": [{"type": "text", "text": "Colour?"},
                                         {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                                         {"type": "image_url", "image_url": {"url": "gs://b/x.png"}}]}])
    assert json.loads(c.choices[0].message.content or "") == {"colour": "red"}
    body = vertex.calls[-1].body
    assert body["generationConfig"] == {"responseMimeType": "application/json"}
    assert body["contents"][0]["parts"][1:] == [{"inlineData": {"mimeType": "image/png", "data": PNG}},
                                                {"fileData": {"mimeType": "image/png", "fileUri": "gs://b/x.png"}}]


def test_mid_stream_error(vertex: GeminiMock, tokens: TokenServer, tmp_path: Path) -> None:
    vertex.on(MODEL, sse(response(text("par"), finish=None),
                         {"error": {"code": 429, "message": "Quota exceeded", "status": "RESOURCE_EXHAUSTED"}}))
    with run_gateway(sa_config(vertex, tmp_path, tokens)) as gw:
        with pytest.raises(openai.APIError) as exc:
            for _ in sdk(gw).chat.completions.create(model="v", stream=True, messages=[USER]):
                pass
    assert "Quota exceeded" in str(exc.value)


# ---------------------------------------------------------------------------
# The OpenAI-compatible endpoint and express mode
# ---------------------------------------------------------------------------

def test_openai_compatible_endpoint(vertex: GeminiMock, tokens: TokenServer, tmp_path: Path) -> None:
    vertex.on(OPENAI_MODEL, Reply(body=chat_completion("from vertex", model=OPENAI_MODEL)),
              Reply(sse=stream_of("a", "b")))
    with run_gateway(sa_config(vertex, tmp_path, tokens)) as gw:
        client = sdk(gw)
        c = client.chat.completions.create(model="vo", messages=[USER], temperature=0.1)
        assert c.choices[0].message.content == "from vertex"
        chunks = list(client.chat.completions.create(model="vo", stream=True, messages=[USER],
                                                     stream_options={"include_usage": True}))
        assert "".join(x.choices[0].delta.content or "" for x in chunks if x.choices) == "ab"
        assert chunks[-1].usage is not None
    assert [r.path for r in vertex.openai_calls] == [f"{PREFIX}/endpoints/openapi/chat/completions"] * 2
    first = vertex.openai_calls[0]
    assert first.headers["authorization"] == "Bearer ya29.mock-access-token-1"
    assert json.loads(first.body) == {"model": OPENAI_MODEL, "messages": [USER], "temperature": 0.1}
    assert tokens.token_requests == 1


def test_express_mode_with_an_api_key(upstream: MockUpstream) -> None:
    mock = GeminiMock(upstream, vertex=True, api_key="vertex-express-key-123")
    mock.on(MODEL, Reply(body=response(text("express"), meta=usage())))
    with run_gateway(config(mock, api_key="vertex-express-key-123")) as gw:
        assert sdk(gw).chat.completions.create(model="v", messages=[USER]).choices[0].message.content == "express"
        with pytest.raises(openai.BadRequestError):
            sdk(gw).chat.completions.create(model="vo", messages=[USER])
    assert mock.problems == []
    assert mock.calls[-1].received.path == f"/v1/publishers/google/models/{MODEL}:generateContent"
    assert mock.calls[-1].received.headers["x-goog-api-key"] == "vertex-express-key-123"


def test_default_endpoints_and_config_keys() -> None:
    cfg = build_config({"api_key": "k", "providers": [
        {"name": "a", "type": "vertex", "project": "p"},
        {"name": "b", "type": "vertex", "project": "p", "location": "global", "api": "openai"},
        {"name": "c", "type": "vertex", "api_key": "x"}]}, "t")
    client = UpstreamClient()
    a, b, c = (VertexProvider(cfg.providers[n], client) for n in "abc")
    assert a.base == "https://us-central1-aiplatform.googleapis.com/v1"
    assert b.base == "https://aiplatform.googleapis.com/v1"
    assert c.base == "https://aiplatform.googleapis.com/v1" and c.express
    from at_gateway.config import Step
    assert a.uses_openai(Step("a", "meta/llama-3.3-70b-instruct-maas", 1)) and not a.uses_openai(Step("a", MODEL, 1))
    assert b.uses_openai(Step("b", MODEL, 1))
    # The full resource name of a Gemini model is the Gemini path, not the OpenAI-compatible one.
    assert not a.uses_openai(Step("a", f"publishers/google/models/{MODEL}", 1))
