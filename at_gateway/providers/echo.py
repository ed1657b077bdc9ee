"""``type: echo``: a built-in provider that answers with the last user message.

It makes ``make run`` useful with no API key at all, and gives tests and
benchmarks an upstream-free route. Usage counts words.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from ..config import Step
from ..http.sse import encode
from .base import Completion, Provider, StreamState


def _last_user_text(body: dict[str, Any]) -> str:
    for msg in reversed(body.get("messages") or []):
        if isinstance(msg, dict) and msg.get("role") == "user":
            content = msg.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _usage(body: dict[str, Any], text: str) -> dict[str, int]:
    prompt = sum(len(str(m.get("content", "")).split()) for m in body.get("messages") or [] if isinstance(m, dict))
    completion = len(text.split())
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class EchoProvider(Provider):
    type_name = "echo"

    async def complete(self, body: dict[str, Any], step: Step) -> Completion:
        text = _last_user_text(body)
        usage = _usage(body, text)
        obj = {
            "id": f"chatcmpl-echo-{time.time_ns():x}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": step.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": usage,
        }
        return Completion(json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode(), usage)

    async def stream(self, body: dict[str, Any], step: Step, state: StreamState) -> AsyncIterator[bytes]:
        text = _last_user_text(body)
        usage = _usage(body, text)
        base = {"id": f"chatcmpl-echo-{time.time_ns():x}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": step.model}
        yield encode({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                           "finish_reason": None}]})
        words = text.split(" ")
        for i, word in enumerate(words):
            piece = word if i == 0 else " " + word
            yield encode({**base, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})
        yield encode({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        state.usage = usage
        state.finish_reason = "stop"
        if state.include_usage:
            yield encode({**base, "choices": [], "usage": usage})
