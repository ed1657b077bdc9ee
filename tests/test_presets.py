"""`type: openai` with `preset:`: the base URL filled in, checked by config, overridden by base_url."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from at_gateway.config import build_config
from at_gateway.errors import ConfigError
from at_gateway.http.pool import UpstreamClient
from at_gateway.providers import build_provider
from at_gateway.providers.presets import PRESETS
from tests.conftest import GATEWAY_KEY, base_config, run_gateway
from tests.mock_upstream import MockUpstream, Reply, chat_completion

# The list: every one of them must be a preset.
REQUIRED = ("groq", "deepseek", "mistral", "together", "openrouter", "cerebras", "xai", "perplexity",
            "fireworks", "ollama", "lmstudio", "vllm")


def preset_config(**provider: Any) -> dict[str, Any]:
    return {"api_key": "k", "providers": [{"name": "p", "type": "openai", **provider}],
            "routes": [{"name": "r", "steps": [{"provider": "p", "model": "m"}]}]}


def provider_url(**provider: Any) -> str:
    cfg = build_config(preset_config(**provider), "t")
    p: Any = build_provider(cfg.providers["p"], UpstreamClient())
    return str(p.url)


def test_every_listed_preset_exists() -> None:
    assert set(REQUIRED) <= set(PRESETS)
    for name, url in PRESETS.items():
        local = name in ("ollama", "lmstudio", "vllm")
        assert url.startswith("http://127.0.0.1:" if local else "https://"), name
        assert not url.endswith("/")


@pytest.mark.parametrize(("preset", "url"), [
    ("groq", "https://api.groq.com/openai/v1/chat/completions"),
    ("deepseek", "https://api.deepseek.com/chat/completions"),
    ("mistral", "https://api.mistral.ai/v1/chat/completions"),
    ("together", "https://api.together.xyz/v1/chat/completions"),
    ("openrouter", "https://openrouter.ai/api/v1/chat/completions"),
    ("cerebras", "https://api.cerebras.ai/v1/chat/completions"),
    ("xai", "https://api.x.ai/v1/chat/completions"),
    ("perplexity", "https://api.perplexity.ai/chat/completions"),
    ("fireworks", "https://api.fireworks.ai/inference/v1/chat/completions"),
    ("ollama", "http://127.0.0.1:11434/v1/chat/completions"),
    ("lmstudio", "http://127.0.0.1:1234/v1/chat/completions"),
    ("vllm", "http://127.0.0.1:8000/v1/chat/completions"),
])
def test_preset_fills_base_url(preset: str, url: str) -> None:
    assert provider_url(preset=preset, api_key="x") == url


def test_base_url_overrides_the_preset() -> None:
    assert provider_url(preset="ollama", base_url="http://gpu-box:11434/v1/") == "http://gpu-box:11434/v1/chat/completions"


def test_unknown_preset_is_rejected_naming_the_known_ones() -> None:
    with pytest.raises(ConfigError) as exc:
        build_config(preset_config(preset="grok"), "t")
    (problem,) = exc.value.problems
    assert problem.startswith("providers[0].preset: unknown preset 'grok'")
    for name in REQUIRED:
        assert name in problem
    with pytest.raises(ConfigError) as exc:
        build_config(preset_config(preset=["groq"]), "t")
    assert exc.value.problems[0].startswith("providers[0].preset: unknown preset")


def test_preset_or_base_url_is_required() -> None:
    with pytest.raises(ConfigError) as exc:
        build_config(preset_config(), "t")
    assert exc.value.problems == ["providers[0].base_url: required for type openai"]


def test_preset_with_base_url_reaches_that_upstream(upstream: MockUpstream) -> None:
    """The preset adapter is the ordinary openai one: same pass-through, Bearer key, /chat/completions."""
    upstream.replies["llama3"] = Reply(body=chat_completion("from the local server"))
    cfg = base_config(upstream.url, [{"name": "r", "steps": [{"provider": "local", "model": "llama3"}]}])
    cfg["providers"].append({"name": "local", "type": "openai", "preset": "vllm", "base_url": upstream.url + "/v1",
                             "api_key": "local-key-123456"})
    with run_gateway(cfg) as gw:
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key=GATEWAY_KEY, max_retries=0, timeout=20)
        answer = client.chat.completions.create(model="r", messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content == "from the local server"
    got = upstream.received[0]
    assert got.path == "/v1/chat/completions"
    assert got.headers["authorization"] == "Bearer local-key-123456"
