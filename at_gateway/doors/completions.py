"""The legacy completions door: ``POST /v1/completions`` through the same routes, keys, limits and log as chat.

Passed through, never translated: the body goes to ``openai`` (and presets) and ``azure`` steps as sent, the
model rewritten (``Provider.complete_text`` / ``stream_text``); every other provider type fails the step with
400, so a route falls through to a step that speaks it. The answer is the upstream's ``text_completion`` as
received; a stream relays the upstream's events as received (usage asked for always, for accounting, and
dropped again when the client did not ask for it, as for chat) and ends with ``data: [DONE]``, or, when it
breaks after its first event, with OpenAI's error event ``data: {"error": ...}`` and no ``[DONE]``. Errors
are OpenAI's shape.

``chat_form`` is False: a client key's routes apply, and :meth:`CompletionsDoor.constrain` applies the rest:
its max_tokens cap caps ``max_tokens``; a key with a system prompt is refused (403), since a raw prompt has
no place to put one and serving it without would quietly lift the key's rule.
"""

from __future__ import annotations

from typing import Any

from ..config import Step
from ..errors import BadRequest, Forbidden
from ..http.sse import DONE_EVENT, encode
from ..providers.base import Completion, Provider, StreamState
from .base import Call, Door, DoorStream, StreamRenderer, json_object

#: What OpenAI (and vLLM) generate when ``max_tokens`` is absent: a key's cap fills it in no higher.
DEFAULT_MAX_TOKENS = 16
_PROMPT_SHAPES = ("'prompt' is required: a string, an array of strings, an array of token ids (integers), or an "
                  "array of token-id arrays")


def _is_token(v: Any) -> bool:
    return type(v) is int and v >= 0


def check_prompt(value: Any) -> None:
    """400 for a ``prompt`` OpenAI's API would refuse."""
    if isinstance(value, str):
        return
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value) or all(_is_token(v) for v in value):
            return
        if all(isinstance(v, list) and v and all(_is_token(t) for t in v) for v in value):
            return
    raise BadRequest(_PROMPT_SHAPES, code="invalid_prompt", extra={"param": "prompt"})


class _Passthrough(StreamRenderer):
    """The upstream's events as they are (the base class's ``feed``); OpenAI's error event on a break."""

    def fail(self, error: dict[str, Any]) -> bytes:
        return encode(error)


_RENDERER = _Passthrough()  # it keeps no state: one for every stream


class CompletionsCall(Call):
    """One legacy completions request: each step's ``complete_text`` / ``stream_text``."""

    async def complete(self, adapter: Provider, prepared: dict[str, Any], step: Step) -> Completion:
        return await adapter.complete_text(prepared, step)

    def open(self, adapter: Provider, prepared: dict[str, Any], step: Step, state: StreamState) -> DoorStream:
        return DoorStream(adapter.stream_text(prepared, step, state), _RENDERER)

    def end(self, agen: Any) -> bytes:
        return DONE_EVENT


class CompletionsDoor(Door):
    name = "completions"
    chat_form = False

    def parse(self, request: Any, decode: Any) -> Call:
        body = json_object(request, decode)
        model = body["model"]
        check_prompt(body.get("prompt"))
        stream = body.get("stream")
        if stream is not None and not isinstance(stream, bool):
            raise BadRequest("'stream' must be true or false", code="invalid_stream", extra={"param": "stream"})
        opts = body.get("stream_options")
        if opts is not None and not isinstance(opts, dict):
            raise BadRequest("'stream_options' must be an object", code="invalid_stream_options",
                             extra={"param": "stream_options"})
        return CompletionsCall(self, model, body, stream=bool(stream))

    def renderer(self, call: Call, step: Step | None, native: bool) -> StreamRenderer:
        return _RENDERER

    def constrain(self, call: Call, system_prompt: str | None, max_tokens: int | None) -> None:
        """A key's max_tokens cap on ``max_tokens`` (absent: OpenAI's default of 16, or the cap if lower, so an
        upstream whose default is unbounded is bounded too); a key's system prompt cannot be honoured."""
        if system_prompt:
            raise Forbidden("this API key has a system prompt, which legacy completions (/v1/completions) cannot "
                            "carry; use /v1/chat/completions", code="system_prompt_required")
        if max_tokens is None:
            return
        body = call.chat
        value = body.get("max_tokens")
        if value is None:
            body["max_tokens"] = min(DEFAULT_MAX_TOKENS, max_tokens)
        elif type(value) is not int:
            raise BadRequest("'max_tokens' must be a whole number", code="invalid_type", extra={"param": "max_tokens"})
        elif value > max_tokens:
            body["max_tokens"] = max_tokens
