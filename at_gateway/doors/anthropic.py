"""The Anthropic Messages door: ``POST /v1/messages`` and ``POST /v1/messages/count_tokens``.

Claude Code and the ``anthropic`` SDKs speak this API. A request names a route in ``model``, as in chat.

Native (an ``anthropic`` step): the body goes as the client sent it, only ``model`` rewritten, with the
client's ``anthropic-beta`` / ``anthropic-version`` headers; the answer and the stream's events come back
unchanged. So ``cache_control``, thinking blocks and their signatures (``signature_delta``), citations and
server tools survive across turns.

Translated (every other step) -> the internal chat body:

* ``system`` (a string or text blocks, joined with a blank line) and ``role: "system"`` messages anywhere in
  ``messages`` (Claude Code sends them mid-conversation) -> system messages in their place.
* user blocks: ``text``, ``image`` (base64 -> a data URL, ``url``), ``document`` (base64 PDF -> a ``file``
  part, plain text and content sources -> text), ``tool_result`` -> ``tool`` messages (before the rest of
  that turn, as chat wants them right after the assistant's tool calls; their images follow in a user message;
  ``is_error`` -> the content starts with ``Error: ``).
* assistant blocks: ``text`` -> content, ``tool_use`` -> ``tool_calls``; thinking blocks are dropped (their
  signatures mean nothing to another model).
* ``tools`` (custom tools) -> function tools; Anthropic's own tools (``web_search_*``, ``bash_*``, ...) cannot
  run elsewhere: dropped, with an ``x-gateway-warning``. ``tool_choice`` auto/any/none/tool -> auto/required/
  none/a named function; ``disable_parallel_tool_use`` -> ``parallel_tool_calls: false``.
* ``stop_sequences`` -> ``stop``; ``temperature``, ``top_p``, ``top_k``; ``metadata.user_id`` -> ``user``;
  ``thinking`` (its budget) and ``output_config.effort`` -> ``reasoning_effort``; ``output_config.format`` ->
  ``response_format`` json_schema. Per step (:func:`_for_step`): OpenAI/Azure get no ``top_k`` (they refuse
  it), ``reasoning_effort`` only for their reasoning models (o-series, gpt-5), which get ``max_completion_tokens``.
* ``cache_control`` is accepted everywhere and dropped (the internal form cannot carry it).

Answers: a chat completion -> a ``message`` (reasoning -> a ``thinking`` block, content -> ``text``, tool
calls -> ``tool_use``); ``finish_reason`` stop/length/tool_calls/content_filter -> ``stop_reason``
end_turn/max_tokens/tool_use/refusal, and ``stop_sequence`` when the upstream names the stop sequence that
matched (vLLM's ``stop_reason``). Usage: ``input_tokens`` (the prompt without cache reads and writes),
``cache_read_input_tokens`` (``prompt_tokens_details.cached_tokens``), ``cache_creation_input_tokens``,
``output_tokens``. Streams: ``message_start``, per block ``content_block_start`` (the first followed by ``ping``) /
``content_block_delta`` (``text_delta``, ``thinking_delta``, ``input_json_delta``) / ``content_block_stop``,
then ``message_delta`` (stop_reason, usage: the counts are known only at the end, so ``message_start``
carries zeros) and ``message_stop``. The common text chunk takes a fast path (:data:`_FAST_TEXT`). Tool calls
whose fragments interleave: the first streams live, the others are sent whole at the end (:class:`MessagesRenderer`).
An empty answer has ``content: []``, as Anthropic's own.

Errors: ``{"type": "error", "error": {"type", "message"}}`` with Anthropic's types per status, and 529
``overloaded_error`` when every attempt of the route was overloaded (upstream 529 or 503); a broken stream ends
with ``event: error`` and that body, never with ``message_stop``, its type the upstream's own when it names one
Anthropic has (:data:`UPSTREAM_TYPES`: overloaded_error, rate_limit_error, OpenAI's rate_limit_exceeded, ...).

``count_tokens``: forwarded to the route's ``anthropic`` steps (the first that answers), else a conservative
estimate (:func:`estimate_tokens`) marked ``x-gateway-token-count: estimated``. Claude Code calls it (with
``?beta=true``) and misbehaves when it is missing.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from typing import TYPE_CHECKING, Any

from ..config import Route, Step
from ..errors import BadRequest, GatewayError
from ..http.sse import event_data
from ..providers.base import Completion, Provider, StreamState, decode_event
from .base import Call, Door, DoorStream, StreamRenderer, dumps

if TYPE_CHECKING:
    from ..context import RequestContext
    from ..http.server import Request, Responder

MESSAGES_OP = "anthropic.messages"
COUNT_OP = "anthropic.count_tokens"
PASSED_HEADERS = frozenset((b"anthropic-beta", b"anthropic-version"))  # to anthropic steps, unchanged

# Anthropic's error type per HTTP status (https://docs.anthropic.com/en/api/errors).
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 529: "overloaded_error"}
_OVERLOADED = frozenset((503, 529))
# A broken stream's event names the upstream's own error (routing's ``upstream_code``: Anthropic's error type, or
# OpenAI's code) as Anthropic's type: Claude Code waits and retries on overloaded_error and rate_limit_error.
UPSTREAM_TYPES = {"overloaded_error": "overloaded_error", "rate_limit_error": "rate_limit_error",
                  "rate_limit_exceeded": "rate_limit_error", "insufficient_quota": "rate_limit_error",
                  "invalid_request_error": "invalid_request_error", "authentication_error": "authentication_error",
                  "permission_error": "permission_error", "not_found_error": "not_found_error"}

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use",
                "content_filter": "refusal"}
# OpenAI's reasoning models: they take reasoning_effort, and max_completion_tokens instead of max_tokens.
_REASONING_MODEL = re.compile(r"(o\d|gpt-5)")
_EFFORTS = {"low": "low", "medium": "medium", "high": "high", "xhigh": "high", "max": "high"}

IMAGE_TOKENS = 1600  # what Anthropic charges a full-size image (about width * height / 750, capped)
TOOL_TOKENS = 400  # the system prompt Anthropic adds when tools are present (a little more than it says)
PDF_BYTES_PER_TOKEN = 20  # a page is 1,500-3,000 tokens and rarely under 50 KB of PDF

_JSON_STRING = rb'"[^"\\\x00-\x1f]*(?:\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4})[^"\\\x00-\x1f]*)*"'  # unrolled: fast
#: The common translated chunk, a text delta and nothing else: its content's JSON string literal is spliced into a
#: prebuilt ``content_block_delta`` (a JSON string literal is valid as it is). Scalars only before ``choices`` (no
#: usage object hides there), one choice, and only null fields after: anything else is decoded.
_FAST_TEXT = re.compile(
    rb'data: ?\{[^{}\[\]\n]*"choices"\s*:\s*\[\s*\{\s*"index"\s*:\s*0\s*,\s*"delta"\s*:\s*\{\s*'
    rb'(?:"role"\s*:\s*"assistant"\s*,\s*)?"content"\s*:\s*(' + _JSON_STRING + rb')\s*\}\s*,\s*'
    rb'(?:"logprobs"\s*:\s*null\s*,\s*)?"finish_reason"\s*:\s*null\s*(?:,\s*"stop_reason"\s*:\s*null\s*)?\}\s*\]\s*'
    rb'(?:,\s*"(?:usage|obfuscation|system_fingerprint|service_tier)"\s*:\s*(?:null|"[^"\\\n]*")\s*)*\}\s*'
).fullmatch

# The events a translated stream is made of, as byte templates (%d: an index; %s: JSON made by dumps, or a
# message id, stop reason or usage that needs no escaping).
_PING = b'event: ping\ndata: {"type":"ping"}\n\n'
_STOP = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
_MESSAGE_START = (b'event: message_start\ndata: {"type":"message_start","message":{"id":"%s","type":"message",'
                  b'"role":"assistant","model":%s,"content":[],"stop_reason":null,"stop_sequence":null,'
                  b'"usage":{"input_tokens":0,"output_tokens":0}}}\n\n')
_TEXT_START = (b'event: content_block_start\ndata: {"type":"content_block_start","index":%d,'
               b'"content_block":{"type":"text","text":""}}\n\n')
_THINKING_START = (b'event: content_block_start\ndata: {"type":"content_block_start","index":%d,'
                   b'"content_block":{"type":"thinking","thinking":"","signature":""}}\n\n')
_TEXT_DELTA = (b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,'
               b'"delta":{"type":"text_delta","text":')
_THINKING_DELTA = (b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,'
                   b'"delta":{"type":"thinking_delta","thinking":%s}}\n\n')
_JSON_DELTA = (b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,'
               b'"delta":{"type":"input_json_delta","partial_json":%s}}\n\n')
_BLOCK_STOP = b'event: content_block_stop\ndata: {"type":"content_block_stop","index":%d}\n\n'
_MESSAGE_DELTA = (b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"%s",'
                  b'"stop_sequence":%s},"usage":%s}\n\n')
_USAGE = b'{"input_tokens":%d,"cache_creation_input_tokens":%d,"cache_read_input_tokens":%d,"output_tokens":%d}'
_NONE, _TEXT, _THINKING, _TOOL = range(4)


def _bad(message: str) -> BadRequest:
    """A 400 as the Messages API words them: the field's path first."""
    return BadRequest(message, code="invalid_request_error")


def _shown(value: Any) -> str:
    return repr(value)[:60]


def _num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int(value: Any) -> int:
    return value if type(value) is int else 0


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def event(name: bytes, obj: Any) -> bytes:
    return b"event: " + name + b"\ndata: " + dumps(obj) + b"\n\n"


def anthropic_error(status: int, message: str, attempts: Any = None) -> tuple[int, dict[str, Any]]:
    """The status and body of an error in Anthropic's shape. ``attempts``: the route's (routing puts them in an
    error's extra); when every one was overloaded (529, or 503) the answer is Anthropic's 529 overloaded_error,
    which clients such as Claude Code wait on and retry, rather than a generic failure."""
    if isinstance(attempts, list) and attempts and all(
            isinstance(a, dict) and a.get("status") in _OVERLOADED for a in attempts):
        status = 529
    etype = ERROR_TYPES.get(status) or ("invalid_request_error" if 400 <= status < 500 else "api_error")
    return status, {"type": "error", "error": {"type": etype, "message": message}}


def _error_event(error: dict[str, Any]) -> bytes:
    """The ``error`` event ending a broken stream. Its status is the 502 (504) a whole answer would have had, so
    the type comes from the upstream's own code when that is one Anthropic's types stand for. When every step
    failed (``attempts``: keep-alives had sent the head) it is the route's verdict, as the whole answer gives it."""
    err = _dict(error.get("error"))
    status, attempts, code = err.get("status"), err.get("attempts"), err.get("upstream_code")
    _, body = anthropic_error(status if type(status) is int else 502, str(err.get("message") or "upstream error"),
                              attempts)
    if isinstance(code, str) and code in UPSTREAM_TYPES and not isinstance(attempts, list):
        body["error"]["type"] = UPSTREAM_TYPES[code]
    return event(b"error", body)


# ---------------------------------------------------------------------------
# Request: Messages -> chat
# ---------------------------------------------------------------------------

def _blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(content, list):
        raise _bad(f"{where}: must be a string or a list of content blocks")
    for j, b in enumerate(content):
        if not isinstance(b, dict) or not isinstance(b.get("type"), str):
            raise _bad(f"{where}.{j}.type: Field required (each content block is an object with a type)")
    return content


def _text(block: dict[str, Any], where: str) -> str:
    t = block.get("text")
    if not isinstance(t, str):
        raise _bad(f"{where}.text: Field required (a string)")
    return t


def _system_text(system: Any, where: str) -> str:
    if isinstance(system, str):
        return system
    return "\n\n".join(_text(b, f"{where}.{j}") for j, b in enumerate(_blocks(system, where)) if b["type"] == "text")


def _image(block: dict[str, Any], where: str, notes: list[str]) -> dict[str, Any] | None:
    src = block.get("source")
    if not isinstance(src, dict):
        raise _bad(f"{where}.source: Field required")
    kind = src.get("type")
    url: Any
    if kind == "base64":
        media, data = src.get("media_type"), src.get("data")
        if not isinstance(media, str) or not isinstance(data, str):
            raise _bad(f"{where}.source: a base64 source takes media_type and data strings")
        url = f"data:{media};base64,{data}"
    elif kind == "url":
        url = src.get("url")
        if not isinstance(url, str):
            raise _bad(f"{where}.source.url: Field required")
    else:
        notes.append(f"{kind} image sources")
        return None
    return {"type": "image_url", "image_url": {"url": url}}


def _document(block: dict[str, Any], where: str, notes: list[str]) -> list[dict[str, Any]]:
    src = block.get("source")
    if not isinstance(src, dict):
        raise _bad(f"{where}.source: Field required")
    kind = src.get("type")
    title = block.get("title") if isinstance(block.get("title"), str) else None
    if kind == "base64" and src.get("media_type") == "application/pdf" and isinstance(src.get("data"), str):
        return [{"type": "file", "file": {"filename": title or "document.pdf",
                                          "file_data": f"data:application/pdf;base64,{src['data']}"}}]
    if kind == "text" and isinstance(src.get("data"), str):
        return [{"type": "text", "text": f"{title}\n\n{src['data']}" if title else src["data"]}]
    if kind == "content":
        inner = src.get("content")
        if isinstance(inner, str):
            return [{"type": "text", "text": inner}]
        parts = []
        for j, b in enumerate(_blocks(inner, f"{where}.source.content")):
            if b["type"] == "text":
                parts.append({"type": "text", "text": _text(b, f"{where}.source.content.{j}")})
            elif b["type"] == "image" and (img := _image(b, f"{where}.source.content.{j}", notes)) is not None:
                parts.append(img)
        return parts
    notes.append(f"{kind} documents")
    return []


def _tool_result(block: dict[str, Any], where: str, notes: list[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    tid = block.get("tool_use_id")
    if not isinstance(tid, str) or not tid:
        raise _bad(f"{where}.tool_use_id: Field required")
    content = block.get("content")
    texts: list[str] = []
    images: list[dict[str, Any]] = []
    if isinstance(content, str):
        texts.append(content)
    elif content is not None:
        for j, b in enumerate(_blocks(content, f"{where}.content")):
            if b["type"] == "text":
                texts.append(_text(b, f"{where}.content.{j}"))
            elif b["type"] == "image":
                if (img := _image(b, f"{where}.content.{j}", notes)) is not None:
                    images.append(img)
            elif b["type"] == "document":
                parts = _document(b, f"{where}.content.{j}", notes)
                texts += [p["text"] for p in parts if p["type"] == "text"]
                images += [p for p in parts if p["type"] != "text"]
            else:
                notes.append(f"{b['type']} blocks in tool results")
    text = "\n".join(texts)
    if block.get("is_error") is True:  # chat's tool messages have no such flag: the model reads it instead
        text = f"Error: {text}" if text else "Error"
    return {"role": "tool", "tool_call_id": tid, "content": text}, images


def _user(content: Any, where: str, out: list[dict[str, Any]], notes: list[str]) -> None:
    if isinstance(content, str):
        out.append({"role": "user", "content": content})
        return
    parts: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    result_images: list[dict[str, Any]] = []  # chat's tool messages carry text only: their images follow
    for j, b in enumerate(_blocks(content, f"{where}.content")):
        kind, bw = b["type"], f"{where}.content.{j}"
        if kind == "text":
            parts.append({"type": "text", "text": _text(b, bw)})
        elif kind == "image":
            if (img := _image(b, bw, notes)) is not None:
                parts.append(img)
        elif kind == "document":
            parts += _document(b, bw, notes)
        elif kind == "tool_result":
            msg, images = _tool_result(b, bw, notes)
            results.append(msg)
            result_images += images
        elif kind not in ("thinking", "redacted_thinking"):
            notes.append(f"{kind} blocks")
    out += results  # right after the assistant's tool calls, as chat requires
    parts = result_images + parts
    if len(parts) == 1 and parts[0]["type"] == "text":
        out.append({"role": "user", "content": parts[0]["text"]})
    elif parts:
        out.append({"role": "user", "content": parts})


def _assistant(content: Any, where: str, out: list[dict[str, Any]], notes: list[str]) -> None:
    if isinstance(content, str):
        out.append({"role": "assistant", "content": content})
        return
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, b in enumerate(_blocks(content, f"{where}.content")):
        kind, bw = b["type"], f"{where}.content.{j}"
        if kind == "text":
            texts.append(_text(b, bw))
        elif kind == "tool_use":
            tid, name, args = b.get("id"), b.get("name"), b.get("input", {})
            if not isinstance(tid, str) or not isinstance(name, str) or not isinstance(args, dict):
                raise _bad(f"{bw}: a tool_use block takes an id, a name and an input object")
            calls.append({"id": tid, "type": "function",
                          "function": {"name": name, "arguments": json.dumps(args, separators=(",", ":"),
                                                                             ensure_ascii=False)}})
        elif kind not in ("thinking", "redacted_thinking"):  # signatures mean nothing to another model
            notes.append(f"{kind} blocks")
    if texts or calls:
        msg: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None}
        if calls:
            msg["tool_calls"] = calls
        out.append(msg)


def _tools(body: dict[str, Any], chat: dict[str, Any], notes: list[str]) -> None:
    tools = body.get("tools")
    if tools is None:
        return
    if not isinstance(tools, list):
        raise _bad("tools: must be a list of tools")
    out: list[dict[str, Any]] = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict):
            raise _bad(f"tools.{i}: must be an object")
        kind = t.get("type")
        if kind not in (None, "custom") or "input_schema" not in t:
            notes.append(f"tool {t.get('name') or kind}")  # Anthropic's own tools run only on Anthropic
            continue
        name, schema = t.get("name"), t.get("input_schema")
        if not isinstance(name, str) or not name:
            raise _bad(f"tools.{i}.name: Field required")
        if not isinstance(schema, dict):
            raise _bad(f"tools.{i}.input_schema: must be a JSON schema object")
        fn: dict[str, Any] = {"name": name}
        if isinstance(t.get("description"), str):
            fn["description"] = t["description"]
        fn["parameters"] = schema
        out.append({"type": "function", "function": fn})
    if not out:
        return
    chat["tools"] = out
    tc = body.get("tool_choice")
    if tc is None:
        return
    kind = tc.get("type") if isinstance(tc, dict) else None
    if kind == "tool":
        name = tc.get("name")
        if not isinstance(name, str):
            raise _bad("tool_choice.name: Field required for type tool")
        if any(f["function"]["name"] == name for f in out):
            chat["tool_choice"] = {"type": "function", "function": {"name": name}}
    elif kind in ("auto", "any", "none"):
        chat["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[kind]
    else:
        raise _bad(f"tool_choice.type: must be auto, any, tool or none (got {_shown(kind)})")
    if tc.get("disable_parallel_tool_use") is True and kind != "none":
        chat["parallel_tool_calls"] = False


def _object(body: dict[str, Any], name: str) -> dict[str, Any]:
    """An optional object field ({} when absent): the Messages API refuses any other type."""
    value = body.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad(f"{name}: must be an object (got {_shown(value)})")
    return value


def _effort(body: dict[str, Any]) -> str | None:
    effort = _object(body, "output_config").get("effort")
    if effort is not None and not isinstance(effort, str):
        raise _bad(f"output_config.effort: must be low, medium, high, xhigh or max (got {_shown(effort)})")
    if effort in _EFFORTS:
        return _EFFORTS[effort]
    th = body.get("thinking")
    if isinstance(th, dict) and th.get("type") == "enabled":
        budget = _int(th.get("budget_tokens"))
        return "low" if budget <= 4096 else "medium" if budget <= 16384 else "high"
    return None


def to_chat(body: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A validated Messages body as the internal chat body, and what translation drops (for the warning)."""
    notes: list[str] = []
    messages: list[dict[str, Any]] = []
    system = body.get("system")
    if system is not None:
        if not isinstance(system, (str, list)):
            raise _bad("system: must be a string or a list of text blocks")
        if text := _system_text(system, "system"):
            messages.append({"role": "system", "content": text})
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise _bad("messages: Field required (a non-empty list of messages)")
    for i, m in enumerate(raw):
        where = f"messages.{i}"
        if not isinstance(m, dict):
            raise _bad(f"{where}: must be an object with a role and content")
        role, content = m.get("role"), m.get("content")
        if not isinstance(content, (str, list)):
            raise _bad(f"{where}.content: must be a string or a list of content blocks")
        if role == "user":
            _user(content, where, messages, notes)
        elif role == "assistant":
            _assistant(content, where, messages, notes)
        elif role == "system":  # not the Messages API's, but Claude Code sends it mid-conversation
            if text := _system_text(content, f"{where}.content"):
                messages.append({"role": "system", "content": text})
        else:
            raise _bad(f"{where}.role: must be 'user' or 'assistant' (got {_shown(role)})")
    chat: dict[str, Any] = {"model": body["model"], "messages": messages, "max_tokens": body["max_tokens"]}
    _tools(body, chat, notes)
    stops = body.get("stop_sequences")
    if stops is not None:
        if not isinstance(stops, list):
            raise _bad(f"stop_sequences: must be a list of strings (got {_shown(stops)})")
        for i, stop in enumerate(stops):
            if not isinstance(stop, str):
                raise _bad(f"stop_sequences.{i}: must be a string (got {_shown(stop)})")
        if stops:
            chat["stop"] = stops
    for name in ("temperature", "top_p"):
        if _num(body.get(name)):
            chat[name] = body[name]
    if type(body.get("top_k")) is int:
        chat["top_k"] = body["top_k"]
    meta = _object(body, "metadata")
    if isinstance(meta.get("user_id"), str) and meta["user_id"]:
        chat["user"] = _chat_user(meta["user_id"])
    _object(body, "thinking")
    if (effort := _effort(body)) is not None:
        chat["reasoning_effort"] = effort
    fmt = _object(body, "output_config").get("format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema" and isinstance(fmt.get("schema"), dict):
        chat["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"]}}
    if body.get("mcp_servers"):
        notes.append("mcp_servers")
    if body.get("stream"):
        # No usage chunk asked for: the renderer reads the usage from the stream's state, which every adapter
        # fills (accounting needs it), and the adapter leaves out a chunk nothing would read.
        chat["stream"] = True
    return chat, notes


def _for_step(body: dict[str, Any], adapter: Provider, step: Step) -> dict[str, Any]:
    """The chat body as a translated step's API can take it: OpenAI refuses ``top_k``, and ``reasoning_effort``
    from any model but its reasoning ones, which refuse ``max_tokens`` instead."""
    if adapter.type_name not in ("openai", "azure"):
        return body
    out = dict(body)
    out.pop("top_k", None)
    if _REASONING_MODEL.match(step.model):
        if "max_tokens" in out:
            out["max_completion_tokens"] = out.pop("max_tokens")
    else:
        out.pop("reasoning_effort", None)
    return out


# ---------------------------------------------------------------------------
# Answers: chat -> Messages
# ---------------------------------------------------------------------------

def anthropic_usage(u: Any) -> dict[str, Any]:
    """Anthropic's usage from OpenAI's: input_tokens excludes what the cache read and wrote."""
    u = u if isinstance(u, dict) else {}
    details = u.get("prompt_tokens_details")
    details = details if isinstance(details, dict) else {}
    read, written = _int(details.get("cached_tokens")), _int(details.get("cache_creation_tokens"))
    out: dict[str, Any] = {"input_tokens": max(_int(u.get("prompt_tokens")) - read - written, 0),
                           "cache_creation_input_tokens": written, "cache_read_input_tokens": read,
                           "output_tokens": _int(u.get("completion_tokens"))}
    cd = u.get("completion_tokens_details")
    if isinstance(cd, dict) and _int(cd.get("reasoning_tokens")):
        out["output_tokens_details"] = {"thinking_tokens": cd["reasoning_tokens"]}
    return out


def _stop_reason(finish: Any, matched: Any, stops: Any) -> tuple[str, str | None]:
    if finish == "stop" and isinstance(matched, str) and isinstance(stops, list) and matched in stops:
        return "stop_sequence", matched
    return STOP_REASONS.get(finish, "end_turn") if isinstance(finish, str) else "end_turn", None


def _message_id() -> str:
    return "msg_" + os.urandom(12).hex()


def _tool_id() -> str:
    return "toolu_" + os.urandom(12).hex()


def _tool_input(arguments: Any) -> dict[str, Any]:
    if isinstance(arguments, dict):
        return arguments
    try:
        value = json.loads(arguments) if isinstance(arguments, str) and arguments.strip() else {}
    except ValueError:
        value = None
    return value if isinstance(value, dict) else {"arguments": arguments}  # kept, not lost


def render_message(obj: dict[str, Any], stops: Any, model: str, usage: Any = None) -> dict[str, Any]:
    """A chat completion as a Messages ``message``."""
    choices = obj.get("choices")
    choice = _dict(choices[0]) if isinstance(choices, list) and choices else {}
    msg = _dict(choice.get("message"))
    content: list[dict[str, Any]] = []
    reasoning = msg.get("reasoning_content") or msg.get("reasoning")
    if isinstance(reasoning, str) and reasoning:
        content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
    text = msg.get("content")
    if isinstance(text, list):
        text = "".join(p.get("text", "") for p in text if isinstance(p, dict) and isinstance(p.get("text"), str))
    if not text and isinstance(msg.get("refusal"), str):
        text = msg["refusal"]
    if isinstance(text, str) and text:
        content.append({"type": "text", "text": text})
    for i, tc in enumerate(msg.get("tool_calls") or []):
        fn = tc.get("function") if isinstance(tc, dict) else None
        if isinstance(fn, dict):
            content.append({"type": "tool_use", "id": str(tc.get("id") or f"toolu_{i}"), "name": str(fn.get("name")),
                            "input": _tool_input(fn.get("arguments"))})
    # Nothing said is no block at all, as Anthropic answers it (an empty text block sent back would be refused).
    stop_reason, stop_sequence = _stop_reason(choice.get("finish_reason"), choice.get("stop_reason"), stops)
    return {"id": _message_id(), "type": "message", "role": "assistant", "model": str(obj.get("model") or model),
            "content": content, "stop_reason": stop_reason, "stop_sequence": stop_sequence,
            "usage": anthropic_usage(usage if usage is not None else obj.get("usage"))}


class _Passthrough(StreamRenderer):
    """A native step's events go out as they came (the provider checks them); only the error event is ours."""

    def fail(self, error: dict[str, Any]) -> bytes:
        return _error_event(error)


def _tool_start(index: int, tid: Any, name: str) -> bytes:
    return event(b"content_block_start", {"type": "content_block_start", "index": index, "content_block": {
        "type": "tool_use", "id": str(tid or _tool_id()), "name": name, "input": {}}})


class MessagesRenderer(StreamRenderer):
    """OpenAI chunks -> Messages events, one chunk at a time.

    Per chunk it does as little as it can: the common text chunk takes :data:`_FAST_TEXT` (``fast``; None decodes
    every chunk, which the tests compare it with), the events it makes are byte templates where the values need
    no escaping, and usage is read from the stream's ``state`` (the adapter decoded it already) at the end.

    Tool calls: chat streams several calls' fragments by index, and some upstreams start every call before any
    arguments, or alternate them; a Messages block takes deltas only between its start and stop. So the first
    call streams live and its block stays open; everything after it (other calls, text) is held and sent whole at
    the end, each block its start, one delta and its stop, indexes in order of appearance."""

    __slots__ = ("stops", "model", "state", "started", "pinged", "kind", "block", "next", "tool", "tool_id",
                 "held", "held_tools", "finish", "matched", "usage", "text_prefix", "fast")

    def __init__(self, stops: Any, model: str, state: StreamState | None = None) -> None:
        self.stops = stops
        self.model = model
        self.state = state
        self.started = False
        self.pinged = False
        self.kind = _NONE  # the open block's kind
        self.block = -1  # the open block's index
        self.next = 0  # the next block's index
        self.tool: int | None = None  # the chat index of the call streaming live (the open block, once set)
        self.tool_id: Any = None
        self.held: list[list[Any]] = []  # blocks for the end, in order: [kind, parts, tool id, tool name]
        self.held_tools: dict[int, list[Any]] = {}  # chat tool call index -> its held block (the latest call)
        self.finish: Any = None
        self.matched: Any = None
        self.usage: Any = None  # from a usage chunk, when an adapter yields one
        self.text_prefix = b""
        self.fast = _FAST_TEXT

    def feed(self, chunk: bytes) -> bytes:
        fast = self.fast
        if fast is not None and self.kind == _TEXT and chunk.count(b"\n\n") <= 1:  # one chunk: the common one?
            m = fast(chunk)
            if m is not None:
                lit = m.group(1)
                return self.text_prefix + lit + b"}}\n\n" if len(lit) > 2 else b""
            out: list[bytes] = []
            self._event(chunk, out)
            return b"".join(out)
        out = []
        for ev in chunk.split(b"\n\n"):  # several chunks joined (as one read of the upstream had them)
            if not ev:
                continue
            m = fast(ev) if fast is not None else None
            if m is None:
                self._event(ev, out)
            elif len(m.group(1)) > 2:  # a text delta (an empty one, like the role chunk's, says nothing)
                if self.kind != _TEXT:
                    self._event(ev, out)  # the first: decoded, for the model name and the block's start
                else:
                    out.append(self.text_prefix + m.group(1) + b"}}\n\n")
        return b"".join(out)

    def _event(self, ev: bytes, out: list[bytes]) -> None:
        d = event_data(ev)
        if d is None or not d.strip():
            return
        obj = decode_event(d)
        if isinstance(obj.get("usage"), dict):
            self.usage = obj["usage"]
        if not self.started and isinstance(obj.get("model"), str):
            self.model = obj["model"]
        choices = obj.get("choices")
        if isinstance(choices, list):
            for ch in choices:
                if isinstance(ch, dict) and ch.get("index", 0) == 0:
                    self._choice(ch, out)

    def _choice(self, ch: dict[str, Any], out: list[bytes]) -> None:
        delta = ch.get("delta")
        if isinstance(delta, dict):
            r = delta.get("reasoning_content") or delta.get("reasoning")
            if isinstance(r, str) and r:
                if self.kind == _TOOL:  # the call's block stays open: held for the end
                    self._hold(_THINKING, r)
                else:
                    self._open(_THINKING, out)
                    out.append(_THINKING_DELTA % (self.block, dumps(r)))
            c = delta.get("content") or delta.get("refusal")
            if isinstance(c, str) and c:
                if self.kind == _TOOL:
                    self._hold(_TEXT, c)
                else:
                    self._open(_TEXT, out)
                    out.append(self.text_prefix + dumps(c) + b"}}\n\n")
            calls = delta.get("tool_calls")
            if isinstance(calls, list):
                for tc in calls:
                    if isinstance(tc, dict):
                        self._tool(tc, out)
        if ch.get("finish_reason"):
            self.finish, self.matched = ch["finish_reason"], ch.get("stop_reason")

    def _start(self, out: list[bytes]) -> None:
        if not self.started:
            self.started = True
            out.append(_MESSAGE_START % (_message_id().encode(), dumps(self.model)))

    def _ping(self, out: list[bytes]) -> None:
        """The ``ping`` goes after the first ``content_block_start``, as Anthropic's own streams send it."""
        if not self.pinged:
            self.pinged = True
            out.append(_PING)

    def _stop_block(self, out: list[bytes]) -> None:
        if self.kind != _NONE:
            out.append(_BLOCK_STOP % self.block)
            self.kind = _NONE

    def _new_block(self, kind: int, out: list[bytes]) -> int:
        self._start(out)
        self._stop_block(out)
        self.kind, self.block = kind, self.next
        self.next += 1
        return self.block

    def _open(self, kind: int, out: list[bytes]) -> None:
        if self.kind == kind:
            return
        index = self._new_block(kind, out)
        if kind == _TEXT:
            out.append(_TEXT_START % index)
            self.text_prefix = _TEXT_DELTA % index
        else:
            out.append(_THINKING_START % index)
        self._ping(out)

    def _hold(self, kind: int, piece: str) -> None:
        last = self.held[-1] if self.held else None
        if last is not None and last[0] == kind != _TOOL:
            last[1].append(piece)
        else:
            self.held.append([kind, [piece], None, None])

    def _tool(self, tc: dict[str, Any], out: list[bytes]) -> None:
        index = tc.get("index", 0)
        index = index if type(index) is int else 0
        fn = _dict(tc.get("function"))
        tid = tc.get("id")
        args = fn.get("arguments")
        args = args if isinstance(args, str) else ""
        held = self.held_tools.get(index)  # newer than the live call: the latest call at its index
        if held is not None and not (tid and tid != held[2]):
            if args:
                held[1].append(args)
            return
        if index == self.tool and held is None and not (tid and tid != self.tool_id):
            if args:
                out.append(_JSON_DELTA % (self.block, dumps(args)))
            return
        # A new call (some upstreams reuse an index for the next one).
        name = str(fn.get("name") or "")
        if self.kind == _TOOL:  # the open call may still get fragments: this one waits for the end
            self.held_tools[index] = entry = [_TOOL, [args] if args else [], tid, name]
            self.held.append(entry)
            return
        block = self._new_block(_TOOL, out)
        self.tool, self.tool_id = index, tid
        out.append(_tool_start(block, tid, name))
        self._ping(out)
        if args:
            out.append(_JSON_DELTA % (block, dumps(args)))

    def close(self) -> bytes:
        out: list[bytes] = []
        self._start(out)
        self._ping(out)  # an answer without content: after message_start
        self._stop_block(out)
        for kind, parts, tid, name in self.held:  # whole, each in its own block, in the order they came
            index, self.next = self.next, self.next + 1
            piece = "".join(parts)
            if kind == _TOOL:
                out.append(_tool_start(index, tid, name))
                if piece:
                    out.append(_JSON_DELTA % (index, dumps(piece)))
            elif kind == _TEXT:
                out += (_TEXT_START % index, _TEXT_DELTA % index, dumps(piece), b"}}\n\n")
            else:
                out += (_THINKING_START % index, _THINKING_DELTA % (index, dumps(piece)))
            out.append(_BLOCK_STOP % index)
        finish = self.finish or ("tool_calls" if self.tool is not None or self.held_tools else "stop")
        stop_reason, stop_sequence = _stop_reason(finish, self.matched, self.stops)
        state = self.state
        u = anthropic_usage(state.usage if state is not None and state.usage is not None else self.usage)
        usage = _USAGE % (u["input_tokens"], u["cache_creation_input_tokens"], u["cache_read_input_tokens"],
                          u["output_tokens"])
        if "output_tokens_details" in u:
            usage = usage[:-1] + b',"output_tokens_details":' + dumps(u["output_tokens_details"]) + b"}"
        out.append(_MESSAGE_DELTA % (stop_reason.encode(), b"null" if stop_sequence is None else dumps(stop_sequence),
                                     usage))
        out.append(_STOP)
        return b"".join(out)

    def fail(self, error: dict[str, Any]) -> bytes:
        return _error_event(error)


def _chat_user(user_id: str) -> str:
    """``metadata.user_id`` as chat's ``user``: as it is when short, else a stable digest of it. Claude Code's
    ids run to about 150 characters, and OpenAI-compatible APIs cap ``user`` (OpenAI at 64): a longer one would
    be a 400 for every request of that client, where the digest still tells its users apart."""
    if len(user_id) <= 64:
        return user_id
    return "u-" + hashlib.sha256(user_id.encode("utf-8", "surrogatepass")).hexdigest()[:48]


# ---------------------------------------------------------------------------
# count_tokens without an anthropic step
# ---------------------------------------------------------------------------

def estimate_tokens(body: dict[str, Any]) -> int:
    """A conservative guess of a Messages request's input tokens: a token per 3 bytes of its JSON text (Claude's
    tokenizers average about 3.5 to 4 characters a token on English and code, the JSON syntax adds more), a
    full-size image for every image, PDFs by their size, and the system prompt tools add. It errs high: Claude
    Code compacts its context by this number, and an estimate too low would let a request overflow."""
    fixed = 0

    def strip(value: Any) -> Any:
        nonlocal fixed
        if isinstance(value, dict):
            kind = value.get("type")
            if kind == "image":
                fixed += IMAGE_TOKENS
                return None
            src = value.get("source")
            if kind == "document" and isinstance(src, dict) and src.get("type") in ("base64", "url", "file"):
                fixed += max(len(str(src.get("data", ""))) * 3 // 4 // PDF_BYTES_PER_TOKEN, IMAGE_TOKENS)
                return None
            return {k: strip(v) for k, v in value.items() if k not in ("cache_control", "signature")}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    parts = {k: strip(body[k]) for k in ("system", "messages", "tools", "tool_choice") if body.get(k) is not None}
    size = len(json.dumps(parts, separators=(",", ":"), ensure_ascii=False).encode())
    return math.ceil(size / 3) + fixed + (TOOL_TOKENS if body.get("tools") else 0) + 8


# ---------------------------------------------------------------------------
# The door
# ---------------------------------------------------------------------------

class AnthropicCall(Call):
    """A Messages request; translated steps get the chat body as their API can take it (:func:`_for_step`)."""

    async def complete(self, adapter: Provider, prepared: dict[str, Any], step: Step) -> Completion:
        if not self.is_native(adapter, step):
            prepared = _for_step(prepared, adapter, step)
        return await super().complete(adapter, prepared, step)

    def open(self, adapter: Provider, prepared: dict[str, Any], step: Step, state: StreamState) -> DoorStream:
        if self.is_native(adapter, step):
            return super().open(adapter, prepared, step, state)
        renderer = MessagesRenderer((self.native or {}).get("stop_sequences"), step.model, state)
        return DoorStream(adapter.stream(_for_step(prepared, adapter, step), step, state), renderer)


class CountCall(Call):
    """A count_tokens request: only anthropic steps are given it (the door leaves the others out)."""

    async def complete(self, adapter: Provider, prepared: dict[str, Any], step: Step) -> Completion:
        return await adapter.send_native(COUNT_OP, self.native_body(step), step, self.headers)


class AnthropicDoor(Door):
    name = "anthropic"
    native_op = MESSAGES_OP

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self._native = _Passthrough()  # stateless: one for every native stream

    # -- requests --------------------------------------------------------------
    @staticmethod
    def _body(request: Request, decode: Any) -> dict[str, Any]:
        body = decode(request.body)
        if not isinstance(body, dict):
            raise _bad("request body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise _bad("model: Field required (a string: the route's name, as GET /v1/models lists them)")
        return body

    @staticmethod
    def _headers(request: Request) -> list[tuple[bytes, bytes]]:
        return [(k, v) for k, v in request.headers if k in PASSED_HEADERS]

    def parse(self, request: Request, decode: Any) -> Call:
        body = self._body(request, decode)
        mt = body.get("max_tokens")
        if mt is None:
            raise _bad("max_tokens: Field required (a whole number of tokens, at least 1)")
        if type(mt) is not int or mt < 1:
            raise _bad(f"max_tokens: must be a whole number of tokens, at least 1 (got {_shown(mt)})")
        stream = body.get("stream")
        if stream is not None and not isinstance(stream, bool):
            raise _bad("stream: must be true or false")
        chat, notes = to_chat(body)
        call = AnthropicCall(self, body["model"], chat, native=body, stream=bool(stream),
                             headers=self._headers(request))
        if notes:
            call.notes.append("translated steps drop: " + ", ".join(dict.fromkeys(notes)))
        return call

    def constrain(self, call: Call, system_prompt: str | None, max_tokens: int | None) -> None:
        """The key's system prompt before the client's (as a text block, so the client's keep their
        cache_control), its max_tokens as a cap (a thinking budget shrunk to fit under it, or dropped)."""
        if call.native is None:
            return
        body = call.native = dict(call.native)
        if system_prompt:
            own = {"type": "text", "text": system_prompt}
            system = body.get("system")
            if isinstance(system, list):
                body["system"] = [own, *system]
            elif isinstance(system, str) and system:
                body["system"] = [own, {"type": "text", "text": system}]
            else:
                body["system"] = system_prompt
        mt = body.get("max_tokens")
        if max_tokens is not None and type(mt) is int and mt > max_tokens:
            body["max_tokens"] = max_tokens
            th = body.get("thinking")
            if isinstance(th, dict) and type(th.get("budget_tokens")) is int and th["budget_tokens"] >= max_tokens:
                if max_tokens > 1024:
                    body["thinking"] = {**th, "budget_tokens": max_tokens - 1}
                else:
                    del body["thinking"]

    # -- answers ---------------------------------------------------------------
    def render(self, call: Call, done: Completion, step: Step) -> bytes:
        obj = json.loads(done.body)  # the adapter checked it is a chat completion
        return dumps(render_message(obj, (call.native or {}).get("stop_sequences"), step.model, done.usage))

    def renderer(self, call: Call, step: Step | None, native: bool) -> StreamRenderer:
        if native:
            return self._native
        return MessagesRenderer((call.native or {}).get("stop_sequences"), step.model if step is not None else "")

    def error_body(self, exc: GatewayError) -> tuple[int, bytes]:
        status, body = anthropic_error(exc.status, exc.message, exc.extra.get("attempts"))
        return status, dumps(body)

    # -- count_tokens ----------------------------------------------------------
    async def serve(self, gateway: Any, ctx: RequestContext, request: Request, responder: Responder,
                    op: str) -> None:
        if op != "count_tokens":
            await super().serve(gateway, ctx, request, responder, op)
            return
        body = self._body(request, gateway.decode_body)
        if not isinstance(body.get("messages"), list):
            raise _bad("messages: Field required (a list of messages)")
        route = gateway.named_route(ctx, body["model"])  # 404 unknown, 403 not this key's
        ctx.route = route.name
        call = CountCall(self, route.name, {"model": route.name, "messages": []}, native=body,
                         headers=self._headers(request))
        key = ctx.key
        if key is not None and key.system_prompt:
            self.constrain(call, key.system_prompt, None)  # what the key's requests will carry is counted
        steps = tuple(s for s in route.steps
                      if (p := gateway.providers.get(s.provider)) is not None and p.native(COUNT_OP, s))
        answer: bytes | None = None
        if steps:
            try:
                answer = (await gateway.router.complete(ctx, Route(route.name, steps, route.limits), call.chat,
                                                        call)).body
            except GatewayError as exc:
                if exc.status == 400:
                    raise  # the request itself is wrong: Messages would refuse it too
        extra: list[tuple[bytes, bytes]] = []
        if answer is None:  # no anthropic step, or none answered: a guess, said to be one
            ctx.provider = ctx.model = None
            answer = dumps({"input_tokens": estimate_tokens(call.native or body)})
            extra.append((b"x-gateway-token-count", b"estimated"))
        ctx.status = 200
        await responder.send(200, [self.content_type, *ctx.gateway_headers(), *extra], answer)
        ctx.first_byte = time.perf_counter()
