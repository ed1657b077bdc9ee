"""`type: azure`: the wire format Azure OpenAI expects, through the openai SDK.

The mock plays Azure: requests are matched by path (the deployment is in the
URL, the body has no ``model``), answers carry Azure's extras
(``prompt_filter_results``, ``content_filter_results``).
"""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest
import yaml

from at_gateway.config import build_config
from at_gateway.errors import ConfigError
from at_gateway.providers.azure import DEFAULT_API_VERSION
from tests.conftest import GATEWAY_KEY, base_config, run_gateway
from tests.mock_upstream import MockUpstream, Reply, chat_completion

AZURE_KEY = "azure-key-0123456789abcdef"
DEPLOYMENT_PATH = "/openai/deployments/{}/chat/completions?api-version={}"

FILTERS = {"hate": {"filtered": False, "severity": "safe"}, "self_harm": {"filtered": False, "severity": "safe"},
           "sexual": {"filtered": False, "severity": "safe"}, "violence": {"filtered": False, "severity": "safe"}}


def path(deployment: str, version: str = DEFAULT_API_VERSION) -> str:
    return DEPLOYMENT_PATH.format(deployment, version)


def azure_config(upstream: MockUpstream, steps: list[dict[str, Any]] | None = None, **provider: Any) -> dict[str, Any]:
    cfg = base_config(upstream.url, [{"name": "az", "steps": steps or [{"provider": "azure", "model": "gpt4o-prod"}]}])
    cfg["providers"].append({"name": "azure", "type": "azure", "base_url": upstream.url, "api_key": AZURE_KEY,
                             **provider})
    return cfg


def azure_completion(content: str) -> dict[str, Any]:
    body = chat_completion(content, model="gpt-4o-2024-08-06")
    body["choices"][0]["content_filter_results"] = FILTERS
    body["prompt_filter_results"] = [{"prompt_index": 0, "content_filter_results": FILTERS}]
    return body


def azure_stream(*words: str, usage: bool = True) -> list[Any]:
    """Azure's event sequence: a prompt-filter-only chunk first, then OpenAI chunks with filter results."""
    base = {"created": 1, "id": "chatcmpl-az", "model": "gpt-4o-2024-08-06", "object": "chat.completion.chunk",
            "system_fingerprint": "fp_az"}
    events: list[Any] = [{"choices": [], "created": 0, "id": "", "model": "", "object": "",
                          "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": FILTERS}]}]
    events.append({**base, "choices": [{"content_filter_results": {}, "delta": {"content": "", "role": "assistant"},
                                        "finish_reason": None, "index": 0, "logprobs": None}]})
    for w in words:
        events.append({**base, "choices": [{"content_filter_results": FILTERS, "delta": {"content": w},
                                            "finish_reason": None, "index": 0, "logprobs": None}]})
    events.append({**base, "choices": [{"content_filter_results": {}, "delta": {}, "finish_reason": "stop",
                                        "index": 0, "logprobs": None}]})
    if usage:
        events.append({**base, "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": len(words),
                                                        "total_tokens": 9 + len(words)}})
    return events


def sdk(gw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=GATEWAY_KEY, max_retries=0, timeout=20)


def test_non_stream_wire_format(upstream: MockUpstream) -> None:
    upstream.replies[path("gpt4o-prod")] = Reply(body=azure_completion("hello from azure"))
    with run_gateway(azure_config(upstream)) as gw:
        raw = sdk(gw).chat.completions.with_raw_response.create(
            model="az", messages=[{"role": "user", "content": "hi"}], temperature=0.2,
            extra_body={"data_sources": [{"type": "azure_search"}]})
        answer = raw.parse()
    assert answer.choices[0].message.content == "hello from azure"
    assert raw.headers["x-gateway-provider"] == "azure" and raw.headers["x-gateway-model"] == "gpt4o-prod"
    (got,) = upstream.received
    assert got.method == "POST"
    assert got.path == f"/openai/deployments/gpt4o-prod/chat/completions?api-version={DEFAULT_API_VERSION}"
    assert got.headers["api-key"] == AZURE_KEY
    assert "authorization" not in got.headers
    assert got.headers["content-type"] == "application/json"
    # The deployment is in the URL; the 2024-10-21 request schema has no `model`. The rest passes through.
    assert got.json == {"messages": [{"role": "user", "content": "hi"}], "temperature": 0.2,
                        "data_sources": [{"type": "azure_search"}]}


@pytest.mark.parametrize("include_usage", [False, True])
def test_stream_wire_format(upstream: MockUpstream, include_usage: bool) -> None:
    upstream.replies[path("gpt4o-prod")] = Reply(sse=azure_stream("Hel", "lo", "!"))
    with run_gateway(azure_config(upstream)) as gw:
        kw: dict[str, Any] = {"stream_options": {"include_usage": True}} if include_usage else {}
        chunks = list(sdk(gw).chat.completions.create(model="az", stream=True,
                                                      messages=[{"role": "user", "content": "hi"}], **kw))
        log = gw.request_logs()[-1]
    (got,) = upstream.received
    assert got.path == path("gpt4o-prod") and got.headers["api-key"] == AZURE_KEY
    assert got.headers["accept"] == "text/event-stream"
    assert "model" not in got.json and got.json["stream"] is True
    assert got.json["stream_options"] == {"include_usage": True}  # asked always, for accounting
    # Azure's prompt-filter-only chunk is not passed on: every chunk but the usage one has a choice.
    content_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in content_chunks) == "Hello!"
    assert content_chunks[0].choices[0].delta.role == "assistant"
    assert content_chunks[-1].choices[0].finish_reason == "stop"
    usage_chunks = [c for c in chunks if not c.choices]
    if include_usage:
        assert len(usage_chunks) == 1 and usage_chunks[0].usage is not None
        assert usage_chunks[0].usage.total_tokens == 12
    else:
        assert usage_chunks == []
    assert log["tokens"]["total_tokens"] == 12


def test_error_before_first_content_falls_through(upstream: MockUpstream) -> None:
    """A prompt-filter chunk followed by an error must not commit the stream to the Azure step."""
    upstream.replies[path("dep-a")] = Reply(sse=azure_stream()[:1] + [
        {"error": {"code": "429", "message": "Requests to the deployment have exceeded the rate limit"}}])
    upstream.replies["backup-model"] = Reply(sse=azure_stream("ok")[1:])
    steps = [{"provider": "azure", "model": "dep-a"}, {"provider": "up1", "model": "backup-model"}]
    with run_gateway(azure_config(upstream, steps)) as gw:
        with sdk(gw).chat.completions.with_streaming_response.create(
                model="az", stream=True, messages=[{"role": "user", "content": "x"}]) as resp:
            assert resp.headers["x-gateway-attempts"] == "2"
            text = "".join(c.choices[0].delta.content or "" for c in resp.parse() if c.choices)
    assert text == "ok"


def test_azure_errors_keep_their_message_and_status(upstream: MockUpstream) -> None:
    upstream.replies[path("missing")] = Reply(status=404, body={"error": {
        "code": "DeploymentNotFound",
        "message": "The API deployment for this resource does not exist."}})
    with run_gateway(azure_config(upstream, [{"provider": "azure", "model": "missing"}])) as gw:
        with pytest.raises(openai.NotFoundError) as exc:
            sdk(gw).chat.completions.create(model="az", messages=[{"role": "user", "content": "x"}])
    assert "deployment for this resource does not exist" in str(exc.value)
    assert exc.value.body["code"] == "DeploymentNotFound"


def test_error_falls_through_to_next_step(upstream: MockUpstream) -> None:
    upstream.replies[path("busy")] = Reply(status=429, body={"error": {"code": "429", "message": "rate limited"}})
    upstream.replies["backup-model"] = Reply(body=chat_completion("from openai"))
    steps = [{"provider": "azure", "model": "busy"}, {"provider": "up1", "model": "backup-model"}]
    with run_gateway(azure_config(upstream, steps)) as gw:
        raw = sdk(gw).chat.completions.with_raw_response.create(model="az", messages=[{"role": "user", "content": "x"}])
    assert raw.headers["x-gateway-attempts"] == "2"
    assert raw.parse().choices[0].message.content == "from openai"


def test_api_version_deployment_quoting_and_base_url_forms(upstream: MockUpstream) -> None:
    version = "2025-04-01-preview"
    upstream.replies[path("my%20dep%2Fx", version)] = Reply(body=azure_completion("quoted"))
    cfg = azure_config(upstream, [{"provider": "azure", "model": "my dep/x"}], api_version=version)
    cfg["providers"][-1]["base_url"] = upstream.url + "/openai/"  # the endpoint with /openai is tolerated
    with run_gateway(cfg) as gw:
        answer = sdk(gw).chat.completions.create(model="az", messages=[{"role": "user", "content": "x"}])
    assert answer.choices[0].message.content == "quoted"
    assert upstream.received[0].path == path("my%20dep%2Fx", version)


def test_api_version_v1_keeps_model_in_the_body(upstream: MockUpstream) -> None:
    upstream.replies["gpt4o-prod"] = Reply(body=azure_completion("v1 api"))
    with run_gateway(azure_config(upstream, api_version="v1")) as gw:
        answer = sdk(gw).chat.completions.create(model="az", messages=[{"role": "user", "content": "x"}])
    assert answer.choices[0].message.content == "v1 api"
    got = upstream.received[0]
    assert got.path == "/openai/v1/chat/completions"
    assert got.json["model"] == "gpt4o-prod" and got.headers["api-key"] == AZURE_KEY


def test_entra_token_in_headers_instead_of_api_key(upstream: MockUpstream) -> None:
    upstream.replies[path("gpt4o-prod")] = Reply(body=azure_completion("entra"))
    cfg = azure_config(upstream, headers={"Authorization": "Bearer entra-token-abcdef123456"})
    del cfg["providers"][-1]["api_key"]
    with run_gateway(cfg) as gw:
        r = httpx.post(gw.url + "/v1/chat/completions", headers={"x-api-key": GATEWAY_KEY},
                       json={"model": "az", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 200
    got = upstream.received[0]
    assert got.headers["authorization"] == "Bearer entra-token-abcdef123456" and "api-key" not in got.headers


def test_config_validation(upstream: MockUpstream) -> None:
    # Unquoted in YAML, an API version is read as a date: it still works.
    raw = yaml.safe_load(f"""
api_key: k
providers:
  - {{name: az, type: azure, base_url: "{upstream.url}", api_key: x, api_version: 2024-06-01}}
routes: [{{name: r, steps: [{{provider: az, model: d}}]}}]
""")
    cfg = build_config(raw, "t")
    assert cfg.providers["az"].options["api_version"] == "2024-06-01"
    at = f"providers[{len(azure_config(upstream)['providers']) - 1}]"
    for bad in ("june", "2024-06-01-beta", 5):
        with pytest.raises(ConfigError) as exc:
            build_config(azure_config(upstream, api_version=bad), "t")
        assert any(p.startswith(f"{at}.api_version:") for p in exc.value.problems)
    missing = azure_config(upstream)
    del missing["providers"][-1]["base_url"]
    with pytest.raises(ConfigError) as exc:
        build_config(missing, "t")
    assert f"{at}.base_url: required for type azure" in exc.value.problems
    with pytest.raises(ConfigError) as exc:
        build_config(azure_config(upstream, preset="groq"), "t")
    assert any(p.startswith(f"{at}.preset: unknown key") for p in exc.value.problems)
