"""One route mixing providers: anthropic -> gemini -> openai, falling through step by step."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests import mock_anthropic as anth
from tests import mock_google as goog
from tests.conftest import GATEWAY_KEY, base_config, run_gateway
from tests.mock_upstream import MockUpstream, Reply, chat_completion, stream_of

GEMINI_MODEL = "gemini-2.5-flash"


@pytest.fixture
def mocks() -> Iterator[tuple[anth.AnthropicMock, goog.GeminiMock, MockUpstream]]:
    ups = [MockUpstream().start() for _ in range(3)]
    try:
        claude = anth.AnthropicMock(ups[0])
        gemini = goog.GeminiMock(ups[1])
        yield claude, gemini, ups[2]
        assert claude.problems == [] and gemini.problems == []
    finally:
        for u in ups:
            u.stop()


def mixed_config(claude: anth.AnthropicMock, gemini: goog.GeminiMock, oa: MockUpstream) -> dict[str, Any]:
    cfg = base_config(oa.url, [{"name": "mixed", "steps": [
        {"provider": "claude", "model": "claude-x", "timeout": "5s"},
        {"provider": "gem", "model": GEMINI_MODEL, "timeout": "5s"},
        {"provider": "up1", "model": "gpt-x", "timeout": "5s"},
    ]}])
    cfg["providers"] += [
        {"name": "claude", "type": "anthropic", "base_url": claude.upstream.url, "api_key": anth.API_KEY},
        {"name": "gem", "type": "gemini", "base_url": gemini.url, "api_key": goog.API_KEY},
    ]
    return cfg


def client(gw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=GATEWAY_KEY, max_retries=0, timeout=20)


MSG = [{"role": "user", "content": "hello"}]


@pytest.mark.parametrize("stream", [False, True])
def test_each_step_answers_when_the_ones_before_fail(mocks: Any, stream: bool) -> None:
    claude, gemini, oa = mocks
    with run_gateway(mixed_config(claude, gemini, oa)) as gw:
        def ask() -> tuple[str, str, str]:
            if stream:
                with client(gw).chat.completions.with_streaming_response.create(
                        model="mixed", messages=MSG, stream=True) as resp:
                    text = "".join(c.choices[0].delta.content or "" for c in resp.parse() if c.choices)
                    return text, resp.headers["x-gateway-provider"], resp.headers["x-gateway-attempts"]
            raw = client(gw).chat.completions.with_raw_response.create(model="mixed", messages=MSG)
            return (raw.parse().choices[0].message.content or "", raw.headers["x-gateway-provider"],
                    raw.headers["x-gateway-attempts"])

        # 1. Claude answers.
        claude.on("claude-x", lambda body: anth.message(anth.text("from claude")))
        assert ask() == ("from claude", "claude", "1")
        # 2. Claude is overloaded (529): Gemini answers.
        claude.on("claude-x", lambda body: anth.error_reply(529, "overloaded_error", "Overloaded"))
        gemini.on(GEMINI_MODEL, goog.sse(goog.response(goog.text("from gemini"))) if stream
                  else Reply(body=goog.response(goog.text("from gemini"))))
        assert ask() == ("from gemini", "gem", "2")
        # 3. Gemini fails too (503): the OpenAI-compatible step answers.
        gemini.on(GEMINI_MODEL, goog.error_reply(503, "The model is overloaded.", "UNAVAILABLE"))
        oa.replies["gpt-x"] = Reply(sse=stream_of("from", " openai")) if stream else Reply(
            body=chat_completion("from openai"))
        assert ask() == ("from openai", "up1", "3")
        # 4. All three fail: 502 with each attempt named.
        oa.replies["gpt-x"] = Reply(status=500, body={"error": {"message": "down"}})
        with pytest.raises(openai.APIStatusError) as exc:
            if stream:
                list(client(gw).chat.completions.create(model="mixed", messages=MSG, stream=True))
            else:
                client(gw).chat.completions.create(model="mixed", messages=MSG)
        assert exc.value.status_code == 502
        attempts = exc.value.body["attempts"]
        assert [(a["provider"], a["status"]) for a in attempts] == [("claude", 529), ("gem", 503), ("up1", 500)]
        assert "Overloaded" in attempts[0]["error"] and "overloaded" in attempts[1]["error"]
