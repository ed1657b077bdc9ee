"""``type: anthropic``: Anthropic's Messages API behind the OpenAI chat-completions API.

API followed: the Messages API, ``POST {base_url}/v1/messages`` with ``x-api-key`` and
``anthropic-version: 2023-06-01`` (the long-standing stable version; ``anthropic_version:``
overrides the header, but the translation below is written for 2023-06-01), as documented
on docs.anthropic.com: request and response shapes, content blocks, the streaming event
sequence (``message_start``, ``content_block_start/delta/stop``, ``message_delta``,
``message_stop``, ``ping``, ``error``) and the error shape ``{"type": "error", "error":
{"type", "message"}}``. Clients never see anything Anthropic-shaped: what comes back is an
OpenAI ``chat.completion`` or a stream of ``chat.completion.chunk`` events.

Request (OpenAI -> Anthropic):

* ``system`` and ``developer`` messages, wherever they are, become ``system`` (in order);
  ``user``/``assistant`` messages become turns of content blocks; consecutive turns of the
  same role are merged (so consecutive ``tool`` messages become one user turn of
  ``tool_result`` blocks, which Anthropic requires to come first in that turn).
* ``tool_calls`` -> ``tool_use`` blocks (arguments parsed as JSON), ``tool`` messages ->
  ``tool_result``; ids are kept, with characters Anthropic rejects replaced the same way on
  both sides so the pair still matches.
* images: ``data:`` URLs -> ``base64`` sources, ``http(s)`` URLs -> ``url`` sources; PDF
  ``file`` parts given as data URLs -> ``document`` blocks. Audio and file ids are refused.
* ``max_completion_tokens`` / ``max_tokens`` -> ``max_tokens``, filled from the provider's
  ``max_tokens`` option (default 4096) when absent, since Anthropic requires it (plus the
  thinking budget when a client's ``thinking`` budget would not fit under it).
* ``stop`` -> ``stop_sequences``; ``temperature`` (clamped to Anthropic's 0..1), ``top_p`` (dropped
  when ``temperature`` is set: recent Claude models refuse both);
  ``user`` -> ``metadata.user_id``; ``top_k`` and ``thinking`` passed on when a client sends them.
* ``tools`` -> ``tools`` (``parameters`` -> ``input_schema``); ``tool_choice`` ``auto`` ->
  ``auto``, ``none`` -> ``none``, ``required`` -> ``any``, a named function -> ``tool``,
  ``allowed_tools`` -> the listed tools with ``auto``/``any``; ``parallel_tool_calls: false`` ->
  ``disable_parallel_tool_use``.
* ``response_format``: ``json_schema`` with an object root (and no client tools, no thinking)
  becomes one forced tool whose ``input_schema`` is the schema; its ``tool_use`` input comes
  back as the message *content* (JSON text) with ``finish_reason: stop``, so the answer
  follows the schema on every Claude model. Otherwise (``json_object``, or a schema next to
  client tools) a system instruction asks for JSON only (with the schema when there is one).
* Refused with a 400 failed step (so the route falls through): ``n`` > 1, audio, files by id,
  non-function tools. Ignored: ``logprobs``, penalties, ``seed``, ``logit_bias``, ``metadata``.

Response (Anthropic -> OpenAI): ``text`` blocks -> ``content``; ``thinking`` blocks ->
``reasoning_content``; ``tool_use`` -> ``tool_calls``; ``stop_reason`` -> ``finish_reason``
(``end_turn``/``stop_sequence``/``pause_turn`` -> ``stop``, ``max_tokens`` and
``model_context_window_exceeded`` -> ``length``, ``tool_use`` -> ``tool_calls``, ``refusal`` ->
``content_filter``); usage -> ``prompt_tokens`` (input + cache reads + cache writes, as
OpenAI counts cached tokens inside the prompt), ``prompt_tokens_details.cached_tokens``
(cache reads; ``cache_creation_tokens`` too when non-zero) and ``completion_tokens``.
Redacted thinking, signatures, citations and server-tool blocks are dropped.

Streams become chunks as events arrive: the role chunk is held back until the first content
(so an ``error`` event right after ``message_start`` still lets the route fall through), tool
calls get a stable ``index`` with ``id`` and ``name`` in their first delta and the
``input_json_delta`` fragments as ``arguments``. An ``error`` event, or a stream that ends
without ``message_stop``, is a failed step, never a clean finish.

Native (the Anthropic Messages door, :mod:`at_gateway.doors.anthropic`): ops ``anthropic.messages`` and
``anthropic.count_tokens`` take the door's body as it is (model already the step's) to ``/v1/messages`` and
``/v1/messages/count_tokens``, with the client's ``anthropic-beta`` / ``anthropic-version`` headers in place of
ours (the provider's configured ``headers:`` still win). Answers come back as the bytes received; a stream's
events pass as they come, except that ``message_start`` and ``ping`` wait for the first content block (an
``error`` event right after ``message_start``, as an overloaded API sends it, still lets the route fall through).
Usage is read from ``message_start`` and ``message_delta`` only (content deltas are not decoded).

Errors keep Anthropic's type and message (``HTTP 400 invalid_request_error: ...``) and status:
a 4xx the client caused comes back with that status once every step refused it; ``overloaded_error``
(529), ``api_error`` (500) and rate limits are failed steps the route falls through.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..config import ProviderConfig, Step
from ..errors import StepFailed
from ..http.errors import UpstreamError
from ..http.pool import Headers, UpstreamClient
from ..http.sse import EventSplitter, encode, event_data, event_name
from .base import (
    Completion,
    Provider,
    QuotedFailure,
    StreamState,
    config_headers,
    decode_event,
    error_from_body,
    read_bounded,
    with_retry_after,
)

DEFAULT_BASE_URL = "https://api.anthropic.com"
DEFAULT_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 4096
JSON_TOOL_DEFAULT = "json_response"
MESSAGES_OP = "anthropic.messages"
COUNT_OP = "anthropic.count_tokens"
NATIVE_OPS = frozenset((MESSAGES_OP, COUNT_OP))
_HELD = frozenset((b"message_start", b"ping"))  # a native stream's head, held until its first content block
_USAGE_EVENTS = frozenset((b"message_start", b"message_delta", b"error"))  # the events a native stream decodes

FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

# Anthropic's documented error types and their HTTP statuses (for stream error events).
ERROR_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "overloaded_error": 529,
}

IMAGE_TYPES = {"image/jpeg", "image/png", "image/gif", "image/webp"}
_DATA_URL = re.compile(r"data:([\w.+-]+/[\w.+-]+)((?:;[^;,]*)*),(.*)", re.S)
_BAD_ID_CHARS = re.compile(r"[^a-zA-Z0-9_-]")
_BAD_NAME_CHARS = re.compile(r"[^a-zA-Z0-9_-]")


def _obj(value: Any) -> dict[str, Any]:
    """``value`` when it is a JSON object, else an empty one."""
    return value if isinstance(value, dict) else {}


class Unsupported(StepFailed):
    """The request cannot be expressed in the Messages API: a 400 failed step."""

    def __init__(self, message: str) -> None:
        super().__init__(f"anthropic: {message}", status=400,
                         error={"message": f"anthropic: {message}", "type": "invalid_request_error",
                                "code": "unsupported_parameter"})


# ---------------------------------------------------------------------------
# Request: OpenAI -> Anthropic
# ---------------------------------------------------------------------------

def tool_id(value: Any) -> str:
    """A tool call id Anthropic accepts (``^[a-zA-Z0-9_-]+$``), the same for tool_use and tool_result."""
    s = _BAD_ID_CHARS.sub("_", str(value or ""))
    return s or "toolu_missing"


def _text_of(content: Any, where: str) -> str:
    """The text of a system/developer/tool message (string or text parts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, dict) and part.get("type") == "text":
                out.append(str(part.get("text", "")))
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise Unsupported(f"{where}: content part of type {kind!r} is not supported here")
        return "\n".join(out)
    raise Unsupported(f"{where}: content must be a string or a list of parts")


def _parse_data_url(url: str, where: str) -> tuple[str, str]:
    m = _DATA_URL.fullmatch(url)
    if not m or ";base64" not in m.group(2).lower():
        raise Unsupported(f"{where}: only base64 data URLs are supported")
    return m.group(1).lower(), m.group(3)


def _image_block(part: dict[str, Any], where: str) -> dict[str, Any]:
    img = part.get("image_url")
    url = img.get("url") if isinstance(img, dict) else img
    if not isinstance(url, str) or not url:
        raise Unsupported(f"{where}: image_url.url is required")
    if url.startswith("data:"):
        media, data = _parse_data_url(url, where)
        if media == "image/jpg":
            media = "image/jpeg"
        if media not in IMAGE_TYPES:
            raise Unsupported(f"{where}: image type {media!r} is not supported (jpeg, png, gif, webp)")
        return {"type": "image", "source": {"type": "base64", "media_type": media, "data": data}}
    if url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise Unsupported(f"{where}: image URL must be a data: URL or an http(s) URL")


def _file_block(part: dict[str, Any], where: str) -> dict[str, Any]:
    f = part.get("file")
    data_url = f.get("file_data") if isinstance(f, dict) else None
    if not isinstance(data_url, str):
        raise Unsupported(f"{where}: files are supported only as file_data data URLs (no file_id)")
    media, data = _parse_data_url(data_url, where)
    if media != "application/pdf":
        raise Unsupported(f"{where}: file type {media!r} is not supported (application/pdf only)")
    return {"type": "document", "source": {"type": "base64", "media_type": media, "data": data}}


def _user_blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise Unsupported(f"{where}: content must be a string or a list of parts")
    blocks: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        pw = f"{where}.content[{j}]"
        if not isinstance(part, dict):
            raise Unsupported(f"{pw}: must be an object")
        kind = part.get("type")
        if kind == "text":
            blocks.append({"type": "text", "text": str(part.get("text", ""))})
        elif kind == "image_url":
            blocks.append(_image_block(part, pw))
        elif kind == "file":
            blocks.append(_file_block(part, pw))
        else:
            raise Unsupported(f"{pw}: content part of type {kind!r} is not supported")
    return blocks


def _assistant_blocks(msg: dict[str, Any], where: str) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    content = msg.get("content")
    if isinstance(content, str):
        if content:
            blocks.append({"type": "text", "text": content})
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and part.get("type") in ("text", "refusal"):
                text = part.get("text") if part.get("type") == "text" else part.get("refusal")
                if text:
                    blocks.append({"type": "text", "text": str(text)})
            else:
                raise Unsupported(f"{where}: assistant content parts must be text")
    elif content is not None:
        raise Unsupported(f"{where}: content must be a string or a list of parts")
    calls = msg.get("tool_calls") or []
    if not isinstance(calls, list):
        raise Unsupported(f"{where}.tool_calls: must be a list")
    for k, call in enumerate(calls):
        cw = f"{where}.tool_calls[{k}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not fn.get("name"):
            raise Unsupported(f"{cw}: function.name is required")
        args = fn.get("arguments") or "{}"
        try:
            parsed = json.loads(args) if isinstance(args, str) else args
        except ValueError:
            raise Unsupported(f"{cw}.function.arguments: not valid JSON") from None
        if not isinstance(parsed, dict):
            raise Unsupported(f"{cw}.function.arguments: must be a JSON object")
        blocks.append({"type": "tool_use", "id": tool_id(call.get("id")), "name": str(fn["name"]), "input": parsed})
    return blocks


def _tool_result(msg: dict[str, Any], where: str) -> dict[str, Any]:
    if not msg.get("tool_call_id"):
        raise Unsupported(f"{where}: tool message needs tool_call_id")
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": tool_id(msg["tool_call_id"])}
    content = msg.get("content")
    if isinstance(content, list) and any(isinstance(p, dict) and p.get("type") == "image_url" for p in content):
        block["content"] = _user_blocks(content, where)
    else:
        text = _text_of(content, where)
        if text:
            block["content"] = text
    return block


def _tools(body: dict[str, Any]) -> list[dict[str, Any]]:
    tools = body.get("tools")
    if not tools:
        return []
    if not isinstance(tools, list):
        raise Unsupported("tools: must be a list")
    out = []
    for i, t in enumerate(tools):
        kind = t.get("type", "function") if isinstance(t, dict) else None
        if kind != "function" or not isinstance(t.get("function"), dict):
            raise Unsupported(f"tools[{i}]: only function tools are supported (got {kind!r})")
        fn = t["function"]
        if not fn.get("name"):
            raise Unsupported(f"tools[{i}].function.name: required")
        params = fn.get("parameters")
        schema: dict[str, Any] = dict(params) if isinstance(params, dict) else {}
        if "type" not in schema:
            schema = {"type": "object", **schema}
        if schema.get("type") == "object" and "properties" not in schema:
            schema["properties"] = {}
        tool: dict[str, Any] = {"name": str(fn["name"])}
        if fn.get("description"):
            tool["description"] = str(fn["description"])
        tool["input_schema"] = schema
        out.append(tool)
    return out


def _tool_choice(body: dict[str, Any], tools: list[dict[str, Any]]) -> tuple[dict[str, Any] | None,
                                                                             list[dict[str, Any]]]:
    """Anthropic's tool_choice (or None) and the tools to send."""
    choice = body.get("tool_choice")
    out: dict[str, Any] | None
    if choice is None:
        out = None
    elif choice == "auto":
        out = {"type": "auto"}
    elif choice == "none":
        out = {"type": "none"}
    elif choice == "required":
        out = {"type": "any"}
    elif isinstance(choice, dict) and choice.get("type") == "function":
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if not name:
            raise Unsupported("tool_choice.function.name: required")
        out = {"type": "tool", "name": str(name)}
    elif isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        spec = _obj(choice.get("allowed_tools")) or choice
        names = {str(t["function"]["name"]) for t in spec.get("tools") or []
                 if isinstance(t, dict) and isinstance(t.get("function"), dict) and t["function"].get("name")}
        tools = [t for t in tools if t["name"] in names]
        out = {"type": "any" if spec.get("mode") == "required" else "auto"}
    else:
        raise Unsupported(f"tool_choice: unsupported value {json.dumps(choice)}")  # routing redacts, then cuts
    if not tools:
        return None, tools
    if body.get("parallel_tool_calls") is False:
        if out is None:
            out = {"type": "auto"}
        if out["type"] != "none":
            out["disable_parallel_tool_use"] = True
    return out, tools


def _json_instruction(schema: Any) -> str:
    what = "JSON value" if schema is not None and schema.get("type", "object") != "object" else "JSON object"
    text = (f"Respond with a single valid {what} and nothing else: no prose before or after it "
            "and no markdown code fences.")
    if schema is not None:
        text += " The JSON must conform to this JSON schema:\n" + json.dumps(schema, ensure_ascii=False)
    return text


@dataclass
class Translated:
    """An Anthropic request body, and what the answer's translation must know about it."""

    body: dict[str, Any]
    json_tool: str | None = None  # tool_use of this name is the JSON answer, shown as content


def to_anthropic(body: dict[str, Any], model: str, default_max_tokens: int = DEFAULT_MAX_TOKENS) -> Translated:
    """Translate an OpenAI chat-completions body into a Messages API body."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise Unsupported("messages: a non-empty list is required")
    n = body.get("n")
    if n is not None and n != 1:
        raise Unsupported("n: only 1 choice per request is supported")
    system: list[str] = []
    turns: list[dict[str, Any]] = []

    def push(role: str, blocks: list[dict[str, Any]]) -> None:
        if not blocks:
            return
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": list(blocks)})

    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise Unsupported(f"{where}: must be an object")
        role = msg.get("role")
        if role in ("system", "developer"):
            text = _text_of(msg.get("content"), where)
            if text:
                system.append(text)
        elif role == "user":
            push("user", _user_blocks(msg.get("content"), where))
        elif role == "assistant":
            push("assistant", _assistant_blocks(msg, where))
        elif role == "tool":
            push("user", [_tool_result(msg, where)])
        else:
            raise Unsupported(f"{where}.role: {role!r} is not supported")

    if not turns:
        raise Unsupported("messages: at least one user or assistant message with content is required")
    for turn in turns:
        blocks = turn["content"]
        if turn["role"] == "user":
            # tool_result blocks must lead the user turn that answers a tool_use.
            blocks.sort(key=lambda b: b["type"] != "tool_result")
        if len(blocks) == 1 and blocks[0]["type"] == "text":
            turn["content"] = blocks[0]["text"]

    tools = _tools(body)
    tool_choice, tools = _tool_choice(body, tools)
    thinking = _obj(body.get("thinking")) or None

    json_tool = None
    rf = body.get("response_format")
    if isinstance(rf, dict):
        kind = rf.get("type")
        if kind == "json_schema":
            spec = _obj(rf.get("json_schema"))
            schema = _obj(spec.get("schema")) or {"type": "object"}
            thinking_on = bool(thinking and thinking.get("type") == "enabled")
            if not tools and not thinking_on and schema.get("type", "object") == "object":
                json_tool = _BAD_NAME_CHARS.sub("_", str(spec.get("name") or JSON_TOOL_DEFAULT))[:64]
                tool_schema = {"type": "object", **schema}
                desc = str(spec.get("description") or "")
                tools = [{"name": json_tool,
                          "description": (desc + "\n" if desc else "")
                          + "Give your final answer by calling this tool; its input is the answer.",
                          "input_schema": tool_schema}]
                tool_choice = {"type": "tool", "name": json_tool}
            else:
                system.append(_json_instruction(schema))
        elif kind == "json_object":
            system.append(_json_instruction(None))
        elif kind not in (None, "text"):
            raise Unsupported(f"response_format.type: {kind!r} is not supported")

    out: dict[str, Any] = {"model": model}
    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    if max_tokens is None:
        max_tokens = default_max_tokens
        budget = thinking.get("budget_tokens") if thinking else None
        if isinstance(budget, int) and budget >= max_tokens:
            max_tokens += budget  # thinking's budget must stay below max_tokens: room for the answer too
    out["max_tokens"] = max_tokens
    if system:
        out["system"] = system[0] if len(system) == 1 else [{"type": "text", "text": s} for s in system]
    out["messages"] = turns
    stop = body.get("stop")
    if isinstance(stop, str):
        out["stop_sequences"] = [stop]
    elif isinstance(stop, list) and stop:
        out["stop_sequences"] = [str(s) for s in stop]
    temp = body.get("temperature")
    if isinstance(temp, (int, float)) and not isinstance(temp, bool):
        out["temperature"] = min(max(float(temp), 0.0), 1.0)
    # Recent Claude models refuse temperature and top_p together: temperature wins.
    if "temperature" not in out and isinstance(body.get("top_p"), (int, float)) \
            and not isinstance(body.get("top_p"), bool):
        out["top_p"] = body["top_p"]
    if isinstance(body.get("top_k"), int) and not isinstance(body.get("top_k"), bool):
        out["top_k"] = body["top_k"]
    if isinstance(body.get("user"), str) and body["user"]:
        out["metadata"] = {"user_id": body["user"]}
    if thinking is not None:
        out["thinking"] = thinking
    if tools:
        out["tools"] = tools
        if tool_choice is not None:
            out["tool_choice"] = tool_choice
    return Translated(out, json_tool)


# ---------------------------------------------------------------------------
# Response: Anthropic -> OpenAI
# ---------------------------------------------------------------------------

def map_usage(u: Mapping[str, Any] | None) -> dict[str, Any]:
    """OpenAI usage from Anthropic's: prompt_tokens include cache reads and writes."""
    u = u if isinstance(u, Mapping) else {}

    def num(key: str) -> int:
        v = u.get(key)
        return v if isinstance(v, int) and not isinstance(v, bool) else 0

    fresh, written, read, out = (num("input_tokens"), num("cache_creation_input_tokens"),
                                 num("cache_read_input_tokens"), num("output_tokens"))
    prompt = fresh + written + read
    details: dict[str, int] = {"cached_tokens": read}
    if written:
        details["cache_creation_tokens"] = written
    usage: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": out, "total_tokens": prompt + out,
                             "prompt_tokens_details": details}
    otd = u.get("output_tokens_details")
    if isinstance(otd, dict) and isinstance(otd.get("thinking_tokens"), int):
        usage["completion_tokens_details"] = {"reasoning_tokens": otd["thinking_tokens"]}
    return usage


def finish_reason(stop_reason: Any, json_answer: bool = False) -> str:
    if stop_reason == "tool_use" and json_answer:
        return "stop"
    return FINISH_REASONS.get(str(stop_reason), "stop")


def _compact(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def from_anthropic(msg: dict[str, Any], json_tool: str | None = None, created: int | None = None,
                   model: str = "") -> dict[str, Any]:
    """Translate a Messages API ``message`` into an OpenAI ``chat.completion``."""
    texts: list[str] = []
    reasoning: list[str] = []
    calls: list[dict[str, Any]] = []
    json_answer = False
    for block in msg.get("content") or []:
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text":
            texts.append(str(block.get("text", "")))
        elif kind == "thinking":
            reasoning.append(str(block.get("thinking", "")))
        elif kind == "tool_use":
            if json_tool is not None and block.get("name") == json_tool:
                texts.append(_compact(block.get("input", {})))
                json_answer = True
            else:
                calls.append({"id": str(block.get("id", "")), "type": "function",
                              "function": {"name": str(block.get("name", "")),
                                           "arguments": _compact(block.get("input", {}))}})
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts or not calls else None}
    if reasoning:
        message["reasoning_content"] = "".join(reasoning)
    if calls:
        message["tool_calls"] = calls
    usage = map_usage(msg.get("usage"))
    return {
        "id": str(msg.get("id") or f"chatcmpl-{uuid.uuid4().hex}"),
        "object": "chat.completion",
        "created": int(time.time()) if created is None else created,
        "model": str(msg.get("model") or model),
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": finish_reason(msg.get("stop_reason"), json_answer)}],
        "usage": usage,
    }


def error_from_anthropic(status: int | None, data: bytes | dict[str, Any], prefix: str = "") -> StepFailed:
    """A failed step from an Anthropic error body or ``error`` event, keeping its message."""
    obj: Any = data
    if isinstance(data, (bytes, bytearray)):
        try:
            obj = json.loads(data)
        except ValueError:
            obj = None
    err = obj.get("error") if isinstance(obj, dict) else None
    if not isinstance(err, dict) or not isinstance(err.get("message"), str):
        if isinstance(data, (bytes, bytearray)):
            return error_from_body(status or 0, bytes(data), "anthropic")
        # Whole: routing redacts secrets by value before it shortens (a cut here could split one).
        return QuotedFailure(f"{prefix}upstream error", _compact(obj), status=status)
    etype = str(err.get("type") or "api_error")
    if status is None:
        status = ERROR_STATUS.get(etype)
    label = f"HTTP {status} {etype}" if not prefix else f"{prefix}{etype}"
    # The type is the code too: routing passes an upstream's code on (``upstream_code`` in a broken stream's
    # error event), and a door tells overloaded_error and rate_limit_error from a generic failure by it.
    return StepFailed(f"{label}: {err['message']}", status=status,
                      error={"message": err["message"], "type": etype, "code": etype})


def _check_message(raw: bytes, json_tool: str | None, model: str) -> dict[str, Any]:
    try:
        obj = json.loads(raw)
    except ValueError:
        raise QuotedFailure("anthropic answered 2xx with a body that is not JSON", raw) from None
    if isinstance(obj, dict) and obj.get("type") == "error":
        raise error_from_anthropic(None, obj, "anthropic answered 2xx with an error: ")
    if not isinstance(obj, dict) or obj.get("type") != "message" or not isinstance(obj.get("content"), list):
        raise StepFailed("anthropic answered 2xx with a body that is not a message")
    return from_anthropic(obj, json_tool, model=model)


# ---------------------------------------------------------------------------
# Streams
# ---------------------------------------------------------------------------

@dataclass
class _Block:
    kind: str  # text | thinking | tool | json | other
    tool_index: int = -1
    args_sent: bool = False


@dataclass
class StreamTranslator:
    """Turns Anthropic stream events into OpenAI chunk objects, one event at a time.

    Pure (no I/O) so that golden tests can drive it with recorded event sequences.
    """

    json_tool: str | None = None
    include_usage: bool = False
    created: int = 0
    model: str = ""
    id: str = ""
    started: bool = False  # the role chunk went out
    finished: bool = False  # message_stop seen
    stop_reason: str | None = None
    usage_raw: dict[str, Any] = field(default_factory=dict)
    blocks: dict[int, _Block] = field(default_factory=dict)
    tools: int = 0
    json_answer: bool = False

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"id": self.id or "chatcmpl-anthropic", "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                  "finish_reason": finish}]}

    def _emit(self, out: list[dict[str, Any]], delta: dict[str, Any]) -> None:
        if not self.started:
            self.started = True
            out.append(self._chunk({"role": "assistant", "content": ""}))
        out.append(self._chunk(delta))

    @property
    def usage(self) -> dict[str, Any]:
        return map_usage(self.usage_raw)

    @property
    def finish_reason(self) -> str:
        return finish_reason(self.stop_reason, self.json_answer)

    def feed(self, name: str, data: dict[str, Any]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if self.finished:
            return out
        if name == "message_start":
            msg = _obj(data.get("message"))
            self.id = str(msg.get("id") or self.id)
            self.model = str(msg.get("model") or self.model)
            if isinstance(msg.get("usage"), dict):
                self.usage_raw.update(msg["usage"])
        elif name == "content_block_start":
            self._block_start(data, out)
        elif name == "content_block_delta":
            self._block_delta(data, out)
        elif name == "content_block_stop":
            block = self._block(data)
            if block is not None and block.kind == "tool" and not block.args_sent:
                # A tool without input: clients json.loads the arguments, so send "{}".
                self._emit(out, {"tool_calls": [{"index": block.tool_index, "function": {"arguments": "{}"}}]})
            elif block is not None and block.kind == "json" and not block.args_sent:
                self._emit(out, {"content": "{}"})
        elif name == "message_delta":
            delta = _obj(data.get("delta"))
            if delta.get("stop_reason"):
                self.stop_reason = str(delta["stop_reason"])
            if isinstance(data.get("usage"), dict):
                # Counts in message_delta are cumulative: they replace, not add.
                self.usage_raw.update({k: v for k, v in data["usage"].items() if v is not None})
        elif name == "message_stop":
            self.finished = True
            if not self.started:
                self.started = True
                out.append(self._chunk({"role": "assistant", "content": ""}))
            out.append(self._chunk({}, self.finish_reason))
            if self.include_usage:
                out.append({"id": self.id or "chatcmpl-anthropic", "object": "chat.completion.chunk",
                            "created": self.created, "model": self.model, "choices": [], "usage": self.usage})
        elif name == "error":
            raise error_from_anthropic(None, data, "anthropic stream error: ")
        # ping and event types added later are ignored, as Anthropic's versioning policy asks.
        return out

    def _block_start(self, data: dict[str, Any], out: list[dict[str, Any]]) -> None:
        idx = data.get("index")
        cb = _obj(data.get("content_block"))
        if not isinstance(idx, int):
            raise StepFailed("anthropic stream: content_block_start without an index")
        kind = cb.get("type")
        if kind == "text":
            self.blocks[idx] = _Block("text")
            if cb.get("text"):
                self._emit(out, {"content": str(cb["text"])})
        elif kind == "thinking":
            self.blocks[idx] = _Block("thinking")
            if cb.get("thinking"):
                self._emit(out, {"reasoning_content": str(cb["thinking"])})
        elif kind == "tool_use" and self.json_tool is not None and cb.get("name") == self.json_tool:
            self.blocks[idx] = _Block("json")
            self.json_answer = True
        elif kind == "tool_use":
            block = self.blocks[idx] = _Block("tool", tool_index=self.tools)
            self.tools += 1
            self._emit(out, {"tool_calls": [{"index": block.tool_index, "id": str(cb.get("id", "")),
                                             "type": "function",
                                             "function": {"name": str(cb.get("name", "")), "arguments": ""}}]})
        else:
            self.blocks[idx] = _Block("other")

    def _block(self, data: dict[str, Any]) -> _Block | None:
        idx = data.get("index")
        return self.blocks.get(idx) if isinstance(idx, int) else None  # a non-int index is no block, not a crash

    def _block_delta(self, data: dict[str, Any], out: list[dict[str, Any]]) -> None:
        block = self._block(data)
        if block is None:
            raise StepFailed("anthropic stream: content_block_delta for a block that never started")
        delta = _obj(data.get("delta"))
        dtype = delta.get("type")
        if dtype == "text_delta" and block.kind == "text":
            if delta.get("text"):
                self._emit(out, {"content": str(delta["text"])})
        elif dtype == "thinking_delta" and block.kind == "thinking":
            if delta.get("thinking"):
                self._emit(out, {"reasoning_content": str(delta["thinking"])})
        elif dtype == "input_json_delta" and block.kind in ("tool", "json"):
            frag = delta.get("partial_json")
            if isinstance(frag, str) and frag:
                block.args_sent = True
                if block.kind == "json":
                    self._emit(out, {"content": frag})
                else:
                    self._emit(out, {"tool_calls": [{"index": block.tool_index, "function": {"arguments": frag}}]})
        # signature_delta, citations_delta and deltas of dropped blocks carry nothing for OpenAI clients.


def parse_event(ev: bytes) -> tuple[str, dict[str, Any]] | None:
    """The (type, payload) of one SSE event, or None for comments and empty events."""
    d = event_data(ev)
    if d is None or not d.strip():
        return None
    obj = decode_event(d, "anthropic")
    name = event_name(ev)
    return (name.decode("latin-1") if name else str(obj.get("type", ""))), obj


# ---------------------------------------------------------------------------
# The provider
# ---------------------------------------------------------------------------

class AnthropicProvider(Provider):
    type_name = "anthropic"

    def __init__(self, cfg: ProviderConfig, client: UpstreamClient) -> None:
        super().__init__(cfg, client)
        base = (cfg.base_url or DEFAULT_BASE_URL).rstrip("/")
        if base.endswith("/v1"):
            base = base[:-3]
        self.url = base + "/v1/messages"
        self.count_url = base + "/v1/messages/count_tokens"
        opts = cfg.options
        mt = opts.get("max_tokens")
        self.max_tokens = mt if isinstance(mt, int) and not isinstance(mt, bool) and mt > 0 else DEFAULT_MAX_TOKENS
        version = opts.get("anthropic_version")
        version = version.strip() if isinstance(version, str) and version.strip() else DEFAULT_VERSION
        extra = config_headers(cfg)
        own = {k for k, _ in extra}
        headers = [(b"content-type", b"application/json")]
        if b"anthropic-version" not in own:
            headers.append((b"anthropic-version", version.encode()))
        if cfg.api_key and b"x-api-key" not in own:
            headers.append((b"x-api-key", cfg.api_key.encode()))
        headers += extra
        self.headers = [*headers, (b"accept", b"application/json")]
        self.stream_headers = [*headers, (b"accept", b"text/event-stream")]
        self._configured = own  # header names the config sets: a client's headers do not replace them

    def _encode(self, body: dict[str, Any], step: Step, stream: bool) -> tuple[bytes, str | None]:
        tr = to_anthropic(body, step.model, self.max_tokens)
        if stream:
            tr.body["stream"] = True
        return json.dumps(tr.body, separators=(",", ":"), ensure_ascii=False).encode(), tr.json_tool

    async def complete(self, body: dict[str, Any], step: Step) -> Completion:
        data, json_tool = self._encode(body, step, False)
        async with self.client.stream(b"POST", self.url, self.headers, data, self.cfg.proxy) as resp:
            if not 200 <= resp.status < 300:
                # a bounded body, never an unbounded error
                raise with_retry_after(error_from_anthropic(resp.status, await read_bounded(resp)), resp)
            raw = await resp.read()
        obj = _check_message(raw, json_tool, step.model)
        return Completion(json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode(), obj["usage"])

    @contextlib.asynccontextmanager
    async def _sse(self, headers: Headers, data: bytes, json_tool: str | None, step: Step) -> AsyncIterator[Any]:
        """A streamed Messages call whose answer is a 2xx event stream; else a failed step (an error answer, or a
        whole message where a stream was asked for: checked, so an error or garbage says what it was)."""
        async with self.client.stream(b"POST", self.url, headers, data, self.cfg.proxy) as resp:
            if not 200 <= resp.status < 300:
                raise with_retry_after(error_from_anthropic(resp.status, await read_bounded(resp)), resp)
            ctype = resp.header(b"content-type") or b""
            if b"text/event-stream" not in ctype:
                raw = await read_bounded(resp)
                _check_message(raw, json_tool, step.model)  # raises for errors and garbage
                raise StepFailed(f"anthropic did not stream (content-type {ctype.decode('latin-1')!r})")
            yield resp

    async def stream(self, body: dict[str, Any], step: Step, state: StreamState) -> AsyncIterator[bytes]:
        data, json_tool = self._encode(body, step, True)
        tr = StreamTranslator(json_tool=json_tool, include_usage=state.include_usage, created=int(time.time()),
                              model=step.model)
        async with self._sse(self.stream_headers, data, json_tool, step) as resp:
            splitter = EventSplitter()
            async for chunk in resp.aiter_raw():
                if tr.finished:
                    continue  # read to the end so the connection can be reused
                out: list[dict[str, Any]] = []
                try:
                    for ev in splitter.feed(chunk):
                        parsed = parse_event(ev)
                        if parsed is not None:
                            out += tr.feed(*parsed)
                            if tr.finished:
                                break
                except StepFailed:
                    if out:  # events that arrived together with the error reach the client first
                        yield b"".join(encode(c) for c in out)
                    raise
                if tr.finished:
                    state.usage = tr.usage
                    state.finish_reason = tr.finish_reason
                if out:
                    yield b"".join(encode(c) for c in out)
        if not tr.finished:
            if not tr.started:
                raise StepFailed("anthropic stream ended before its first chunk")
            raise StepFailed("anthropic stream ended before message_stop")

    # -- native: the Anthropic Messages door's body as it is ------------------------------------
    def native(self, op: str, step: Step) -> bool:
        return op in NATIVE_OPS

    def _with_client(self, ours: Headers, client: Headers) -> Headers:
        """Our headers with the client's (``anthropic-beta``, ``anthropic-version``) in place of ours of the same
        name; those the provider's config sets stay."""
        passed = [(k, v) for k, v in client if k not in self._configured]
        if not passed:
            return ours
        names = {k for k, _ in passed}
        return [h for h in ours if h[0] not in names] + passed

    async def send_native(self, op: str, body: dict[str, Any], step: Step, headers: Headers) -> Completion:
        if op not in NATIVE_OPS:
            return await super().send_native(op, body, step, headers)
        data = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        url = self.url if op == MESSAGES_OP else self.count_url
        async with self.client.stream(b"POST", url, self._with_client(self.headers, headers), data,
                                      self.cfg.proxy) as resp:
            if not 200 <= resp.status < 300:
                raise with_retry_after(error_from_anthropic(resp.status, await read_bounded(resp)), resp)
            raw = await resp.read()
        try:
            obj = json.loads(raw)
        except ValueError:
            raise QuotedFailure("anthropic answered 2xx with a body that is not JSON", raw) from None
        if isinstance(obj, dict) and obj.get("type") == "error":
            raise error_from_anthropic(None, obj, "anthropic answered 2xx with an error: ")
        if op == COUNT_OP:
            if not isinstance(obj, dict) or type(obj.get("input_tokens")) is not int:
                raise StepFailed("anthropic answered count_tokens with a body that is not a token count")
            return Completion(raw, None)
        if not isinstance(obj, dict) or obj.get("type") != "message" or not isinstance(obj.get("content"), list):
            raise StepFailed("anthropic answered 2xx with a body that is not a message")
        return Completion(raw, map_usage(obj.get("usage")))

    async def stream_native(self, op: str, body: dict[str, Any], step: Step, state: StreamState,
                            headers: Headers) -> AsyncIterator[bytes]:
        if op != MESSAGES_OP:
            raise StepFailed(f"anthropic: {op} does not stream", status=400)
        data = json.dumps({**body, "stream": True}, separators=(",", ":"), ensure_ascii=False).encode()
        usage: dict[str, Any] = {}
        stop_reason: Any = None
        held: list[bytes] = []  # message_start and ping, until the first content block
        opened = finished = False
        async with self._sse(self._with_client(self.stream_headers, headers), data, None, step) as resp:
            splitter = EventSplitter()
            try:
                async for chunk in resp.aiter_raw():
                    if finished:
                        continue  # read to the end so the connection can be reused
                    out: list[bytes] = held
                    held = []
                    for ev in splitter.feed(chunk):
                        name = event_name(ev)
                        if name in _USAGE_EVENTS or name is None:
                            parsed = parse_event(ev)
                            if parsed is None:
                                continue
                            kind, obj = parsed
                            if name is None:  # a data-only event: its data's type names it (as parse_event reads)
                                name = kind.encode("utf-8", "replace")
                            if kind == "error":
                                if opened and out:  # what came with the error reaches the client first
                                    yield b"".join(out)
                                raise error_from_anthropic(None, obj, "anthropic stream error: ")
                            if kind == "message_start":
                                usage.update(_obj(_obj(obj.get("message")).get("usage")))
                                state.usage = map_usage(usage)
                            elif kind == "message_delta":
                                usage.update({k: v for k, v in _obj(obj.get("usage")).items() if v is not None})
                                stop_reason = _obj(obj.get("delta")).get("stop_reason") or stop_reason
                                state.usage = map_usage(usage)
                        if not opened and name not in _HELD:
                            opened = True
                        out.append(ev)
                        if name == b"message_stop":
                            finished = opened = True
                            state.finish_reason = finish_reason(stop_reason)
                            break
                    if not opened:
                        held = out  # no content yet: an error now still lets the route fall through
                    elif out:
                        yield b"".join(out)
            except UpstreamError:
                if not finished:
                    raise
        if not finished:
            if not opened:
                raise StepFailed("anthropic stream ended before its first content block")
            raise StepFailed("anthropic stream ended before message_stop")
