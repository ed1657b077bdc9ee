"""The OpenAI Responses door: ``POST /v1/responses``; ``GET``/``DELETE /v1/responses/{id}`` and
``GET /v1/responses/{id}/input_items`` for kept responses.

Request (Responses -> chat, for translated steps):

* ``input`` as a string (one user message) or items: ``message`` items (roles user, assistant, system,
  developer; ``input_text``/``output_text``/``refusal`` text, ``input_image`` by URL, ``input_file`` data
  or id, ``input_audio``), ``function_call`` -> an assistant ``tool_calls`` entry (consecutive calls, and a
  call right after an assistant message, share one assistant message), ``function_call_output`` -> a
  ``tool`` message, ``custom_tool_call``/``custom_tool_call_output`` likewise (the input as the one string
  argument ``input``). ``reasoning`` items are dropped (a translated upstream cannot read them); other items
  (built-in tool calls, ``item_reference``) are dropped with a note in ``x-gateway-warning``.
* ``instructions`` -> a leading system message; ``max_output_tokens`` -> ``max_tokens`` (
  ``max_completion_tokens`` on openai/azure steps running OpenAI's reasoning models, which refuse
  ``max_tokens``); ``reasoning.effort`` -> ``reasoning_effort``; ``text.format`` -> ``response_format``
  (``json_schema``, ``json_object``); ``text.verbosity`` -> ``verbosity``; ``temperature``, ``top_p``,
  ``parallel_tool_calls``, ``user``, ``safety_identifier``, ``prompt_cache_key`` (Chat Completions takes it
  too) and ``service_tier`` as they are. ``include``, ``truncation``, ``metadata``, ``store`` and
  ``reasoning.summary`` stay at the door.
* ``tools``: ``function`` tools flattened into chat's ``{"type": "function", "function": {...}}``;
  ``custom`` (freeform) tools such as Codex's ``apply_patch`` become a function with one string argument
  ``input`` (a grammar, when the tool has one, goes into the description) and their calls come back as
  ``custom_tool_call`` items; built-in tools (``web_search``, ``file_search``, ...) are dropped with a note.
  ``tool_choice`` ``auto``/``none``/``required``, a named function or custom tool, and ``allowed_tools``.

Answer: the ``response`` object (``output`` items: ``reasoning`` with ``reasoning_text`` when the upstream
gave reasoning, one assistant ``message`` with ``output_text``, a ``function_call`` or ``custom_tool_call``
per tool call; ``status`` ``completed``, or ``incomplete`` with ``incomplete_details.reason``
``max_output_tokens``/``content_filter``; ``usage`` with ``input_tokens_details.cached_tokens`` and
``output_tokens_details.reasoning_tokens``). Streams: ``response.created``, ``response.in_progress``, then
per item ``response.output_item.added``, ``response.content_part.added``, ``response.output_text.delta`` ...
``.done``, ``response.content_part.done``, ``response.output_item.done`` (a chat ``refusal``: the message's
``refusal`` part, ``response.refusal.delta``/``.done``; function calls:
``response.function_call_arguments.delta``/``.done``; custom tools ``response.custom_tool_call_input.*``),
and ``response.completed`` (or ``response.incomplete``) with ``id`` and ``usage``; each event has a
``sequence_number``. A stream that breaks, or every step failing after keep-alives sent the head, ends with
``response.failed`` whose ``error.code`` is what clients branch on (``rate_limit_exceeded``,
``insufficient_quota``, ``context_length_exceeded``, ``invalid_prompt``, ``server_error``).

Native: a step whose provider speaks Responses (``openai`` with ``wire_api: responses``) gets the body as
sent, ``model`` rewritten; its answer and events pass through unchanged (only ``response.completed`` is held
until the response is kept, see below).

Reasoning items the gateway made have ids starting ``rs_atg_`` (``GATEWAY_REASONING``): a translated step's
thinking (Anthropic thinking, Gemini thoughts, ``reasoning_content``) as a ``reasoning`` item with
``reasoning_text``, and a client's reasoning item kept without an id. No Responses upstream knows those ids
and it refuses a request that carries one (400 ``item_not_found``), so native steps never get them: neither
in the context expanded from ``previous_response_id`` nor when the client resends them in ``input`` (Codex
sends the whole history back). Translated steps drop every reasoning item. A key's ``max_tokens`` cap
reaches native steps as ``max_output_tokens``, never below 16 (the API's minimum, as for translation).

Kept responses (``store``, ``previous_response_id``): with a store file, each answer whose request did not
say ``store: false`` is kept for ``response.retention`` (store/responses.py) with the whole context it was
made from. A follow-up naming it as ``previous_response_id`` gets that context and the earlier output before
its own input, on every step, native ones too: the body a native step gets carries the expanded ``input``
and no ``previous_response_id``, so the follow-up works whichever step answered the first turn (a
fallback, another provider); the upstream's own stored responses are never relied on. Only the caller that
made a response (``ctx.client``: the same key) can use, read or delete it. Without a store file,
``previous_response_id`` and ``GET``/``DELETE`` answer 400.

Why a follow-up right after the answer finds it, also with ``workers: N``: the row is committed before the
answer's last byte is sent. A whole answer is kept in :meth:`ResponsesDoor.finished`, which the gateway
awaits before it sends the answer; a stream is kept by its ``on_close`` (``ResponsesCall._kept``), which awaits
the write after the step's clean end and before it hands routing the closing event (``response.completed``), the event a
client waits for before it sends the next turn. Every worker opens the same file (WAL), so the next turn
finds the row whichever worker it reaches. The write runs in a worker thread (never on the event loop); a
write that fails is logged and the answer still goes out (the follow-up then gets a clear 400).

A client key's system prompt reaches a native step as a leading ``system`` input item, not in
``instructions``, which the upstream would echo back to the client in the response object.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_to_bytes

from ..config import Step
from ..errors import BadRequest, NotFound
from ..http.pool import Headers
from ..http.sse import EventSplitter, event_data
from ..providers.base import Completion, Provider, StreamState
from ..providers.openai_responses import MIN_OUTPUT_TOKENS
from .base import Call, Door, DoorStream, StreamRenderer, dumps, sse

if TYPE_CHECKING:
    from ..context import RequestContext
    from ..http.server import Request, Responder
    from ..store.responses import ResponseStore

log = logging.getLogger("at_gateway.doors.responses")

NATIVE_OP = "responses"
_STR_FIELDS = ("user", "safety_identifier", "prompt_cache_key", "service_tier")  # chat takes them as they are
# OpenAI's reasoning models refuse max_tokens (as app.py's key cap knows): max_completion_tokens for them.
_COMPLETION_TOKENS_MODEL = re.compile(r"(o\d|gpt-5)")
_COMPLETION_TOKENS_TYPES = frozenset(("openai", "azure"))
# Tuples, not sets: what a client sends may be any JSON value (a list is no set member, it is unhashable).
_MESSAGE_ROLES = ("user", "assistant", "system", "developer")
_TEXT_PARTS = ("input_text", "output_text", "text")
_FORMATS = ("text", "json_object", "json_schema")
_TOOL_CHOICES = ("auto", "none", "required")
# The codes a Responses client branches on (Codex: rate limits wait and retry, quota and context stop, ...).
_FAILURE_CODES = ("server_error", "rate_limit_exceeded", "insufficient_quota", "context_length_exceeded",
                            "invalid_prompt", "vector_store_timeout", "invalid_image", "invalid_image_format",
                            "invalid_base64_image", "invalid_image_url", "image_too_large", "image_too_small",
                            "image_parse_error", "image_content_policy_violation", "invalid_image_mode",
                            "image_file_too_large", "unsupported_image_media_type", "empty_image_file",
                            "failed_to_download_image", "image_file_not_found")
_CONTEXT_HINT = re.compile(r"context[ _-]?(length|window)|too many tokens|maximum context|prompt is too long", re.I)
_RETRY_IN = re.compile(r"retry in (\d+(?:\.\d+)?)s")
_SEQ = re.compile(rb'"sequence_number":\s*(\d+)')
_CUSTOM_PARAMETERS = {"type": "object", "properties": {"input": {"type": "string", "description":
                      "The tool's whole input, as free text."}}, "required": ["input"], "additionalProperties": False}
_EMPTY_PARAMETERS = {"type": "object", "properties": {}}
# Reasoning items the gateway made (a translated step's thinking, or a client's reasoning item that came without an
# id) have ids of their own prefix: no Responses upstream knows them (see _for_native).
GATEWAY_REASONING = "rs_atg_"
_ID_PREFIX = {"message": "msg_", "function_call": "fc_", "function_call_output": "fco_", "custom_tool_call": "ctc_",
              "custom_tool_call_output": "ctco_", "reasoning": GATEWAY_REASONING}


def _new_id(prefix: str) -> str:
    return prefix + os.urandom(16).hex()


def _bad(message: str, param: str | None = None, code: str = "invalid_request") -> BadRequest:
    """A 400 in OpenAI's shape, naming the parameter at fault as the API does (``error.param``)."""
    return BadRequest(message, code=code, extra={"param": param})


def _int(value: Any) -> int:
    return value if type(value) is int else 0


# -- the request ----------------------------------------------------------------------------------------------

def check(body: dict[str, Any]) -> None:
    """What the Responses API itself refuses, as its 400s (the rest is translated or passed on)."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("'model' is required and must be a string (a route name; GET /v1/models lists them)", "model",
                   "missing_model")
    inp = body.get("input")
    if inp is not None and not isinstance(inp, (str, list)):
        raise _bad("'input' must be a string or a list of input items", "input")
    if isinstance(inp, list):
        for i, item in enumerate(inp):
            if not isinstance(item, dict):
                raise _bad(f"input[{i}]: must be an object (an input item)", f"input[{i}]")
    if inp is None and body.get("previous_response_id") is None and not body.get("instructions"):
        raise _bad("'input' is required: a string, or a list of input items", "input")
    for name in ("stream", "store", "parallel_tool_calls", "background"):
        v = body.get(name)
        if v is not None and not isinstance(v, bool):
            raise _bad(f"'{name}' must be true or false", name)
    if body.get("background"):
        raise _bad("'background' responses are not supported by this gateway (send the request without it)",
                   "background", "unsupported_parameter")
    if body.get("conversation") is not None:
        raise _bad("'conversation' is not supported by this gateway: use previous_response_id, or send the "
                   "whole history in 'input'", "conversation", "unsupported_parameter")
    mot = body.get("max_output_tokens")
    if mot is not None and (type(mot) is not int or mot < 1):
        raise _bad("'max_output_tokens' must be a whole number >= 1", "max_output_tokens")
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise _bad("'instructions' must be a string", "instructions")
    prev = body.get("previous_response_id")
    if prev is not None and (not isinstance(prev, str) or not prev):
        raise _bad("'previous_response_id' must be a response id (a string)", "previous_response_id")
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise _bad("'tools' must be a list of tools", "tools")
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict) or not isinstance(tool.get("type"), str):
                raise _bad(f"tools[{i}]: must be an object with a 'type'", f"tools[{i}]")
            if tool["type"] in ("function", "custom") and (not isinstance(tool.get("name"), str) or not tool["name"]):
                raise _bad(f"tools[{i}].name: required (a string)", f"tools[{i}].name")
            if tool["type"] == "function" and tool.get("parameters") is not None and not isinstance(
                    tool["parameters"], dict):
                raise _bad(f"tools[{i}].parameters: must be a JSON schema object", f"tools[{i}].parameters")
    choice = body.get("tool_choice")
    if choice is not None and not (choice in _TOOL_CHOICES or (isinstance(choice, dict)
                                                                and isinstance(choice.get("type"), str))):
        raise _bad("'tool_choice' must be auto, none, required or a tool choice object", "tool_choice")
    for name in ("text", "reasoning"):
        v = body.get(name)
        if v is not None and not isinstance(v, dict):
            raise _bad(f"'{name}' must be an object", name)
    fmt = (body.get("text") or {}).get("format")
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") not in _FORMATS:
            raise _bad("'text.format.type' must be text, json_object or json_schema", "text.format")
        if fmt["type"] == "json_schema" and (not isinstance(fmt.get("name"), str) or not isinstance(
                fmt.get("schema"), dict)):
            raise _bad("'text.format' of type json_schema needs a 'name' (string) and a 'schema' (object)",
                       "text.format")


def input_items(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The request's ``input`` as items (a string is one user message)."""
    inp = body.get("input")
    if inp is None:
        return []
    if isinstance(inp, str):
        return [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": inp}]}]
    return inp


def _text_of(content: Any, where: str) -> str:
    """The text of a content that may only hold text (system, assistant, tool output)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(f"{where}: must be a string or a list of content parts", where)
    out = []
    for j, part in enumerate(content):
        if not isinstance(part, dict):
            raise _bad(f"{where}[{j}]: must be an object (a content part)", f"{where}[{j}]")
        if part.get("type") in _TEXT_PARTS and isinstance(part.get("text"), str):
            out.append(part["text"])
        elif part.get("type") == "refusal" and isinstance(part.get("refusal"), str):
            out.append(part["refusal"])
    return "\n".join(out)


def _user_content(content: Any, where: str, notes: list[str]) -> Any:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(f"{where}: must be a string or a list of content parts", where)
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        w = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise _bad(f"{w}: must be an object (a content part)", w)
        kind = part.get("type")
        if kind in _TEXT_PARTS:
            if not isinstance(part.get("text"), str):
                raise _bad(f"{w}.text: required (a string)", f"{w}.text")
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "input_image":
            url = part.get("image_url")
            if isinstance(url, str) and url:
                image: dict[str, Any] = {"url": url}
                if part.get("detail") in ("low", "high", "auto"):
                    image["detail"] = part["detail"]
                parts.append({"type": "image_url", "image_url": image})
            else:
                notes.append("input_image by file_id dropped on translated steps (send image_url)")
        elif kind == "input_file":
            file: dict[str, Any] = {}
            if isinstance(part.get("file_data"), str):
                file["file_data"] = part["file_data"]
            elif isinstance(part.get("file_id"), str):
                file["file_id"] = part["file_id"]
            if file and isinstance(part.get("filename"), str):
                file["filename"] = part["filename"]
            if file:
                parts.append({"type": "file", "file": file})
            else:
                notes.append("input_file by file_url dropped on translated steps (send file_data)")
        elif kind == "input_audio" and isinstance(part.get("input_audio"), dict):
            parts.append({"type": "input_audio", "input_audio": part["input_audio"]})
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            parts.append({"type": "text", "text": part["refusal"]})
        else:
            notes.append(f"content part {str(kind)[:40]!r} dropped on translated steps")
    if len(parts) == 1 and parts[0]["type"] == "text":
        return parts[0]["text"]
    return parts


def _messages(items: list[dict[str, Any]], notes: list[str]) -> list[dict[str, Any]]:
    """Input items as chat messages (see the module docstring)."""
    messages: list[dict[str, Any]] = []
    dropped: list[str] = []

    def call(tool_call: dict[str, Any]) -> None:
        last = messages[-1] if messages else None
        if last is not None and last["role"] == "assistant":
            last.setdefault("tool_calls", []).append(tool_call)
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [tool_call]})

    for i, item in enumerate(items):
        w = f"input[{i}]"
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in _MESSAGE_ROLES:
                raise _bad(f"{w}.role: must be user, assistant, system or developer", f"{w}.role")
            content = item.get("content")
            if role == "user":
                messages.append({"role": "user", "content": _user_content(content, f"{w}.content", notes)})
            elif role == "assistant":
                messages.append({"role": "assistant", "content": _text_of(content, f"{w}.content")})
            else:
                messages.append({"role": role, "content": _text_of(content, f"{w}.content")})
        elif kind in ("function_call", "custom_tool_call"):
            call_id, name = item.get("call_id"), item.get("name")
            if not isinstance(call_id, str) or not isinstance(name, str):
                raise _bad(f"{w}: a {kind} needs 'call_id' and 'name' (strings)", w)
            if kind == "function_call":
                args = item.get("arguments", "")
                if not isinstance(args, str):
                    raise _bad(f"{w}.arguments: must be a string (JSON text)", f"{w}.arguments")
            else:
                text = item.get("input", "")
                if not isinstance(text, str):
                    raise _bad(f"{w}.input: must be a string", f"{w}.input")
                args = json.dumps({"input": text}, ensure_ascii=False)
            call({"id": call_id, "type": "function", "function": {"name": name, "arguments": args or "{}"}})
        elif kind in ("function_call_output", "custom_tool_call_output"):
            call_id = item.get("call_id")
            if not isinstance(call_id, str):
                raise _bad(f"{w}.call_id: required (a string)", f"{w}.call_id")
            output = item.get("output", "")
            if isinstance(output, list) and any(isinstance(p, dict) and p.get("type") not in _TEXT_PARTS
                                                for p in output):
                notes.append("images and files in tool outputs dropped on translated steps")
            messages.append({"role": "tool", "tool_call_id": call_id, "content": _text_of(output, f"{w}.output")})
        elif kind == "reasoning":
            continue  # the upstream's own (encrypted) reasoning: only a native step can read it
        elif isinstance(kind, str):
            dropped.append(kind[:40])
        else:
            raise _bad(f"{w}.type: required (message, function_call, function_call_output, ...)", f"{w}.type")
    if dropped:
        notes.append(f"input items dropped on translated steps: {', '.join(dict.fromkeys(dropped))}")
    return messages


def _tools(tools: list[dict[str, Any]], notes: list[str]) -> tuple[list[dict[str, Any]], frozenset[str]]:
    """Chat tools, and the names of the custom (freeform) ones."""
    out: list[dict[str, Any]] = []
    custom: set[str] = set()
    dropped: list[str] = []
    for tool in tools:
        kind = tool["type"]
        if kind == "function":
            fn: dict[str, Any] = {"name": tool["name"], "parameters": tool.get("parameters") or _EMPTY_PARAMETERS}
            if isinstance(tool.get("description"), str):
                fn["description"] = tool["description"]
            if isinstance(tool.get("strict"), bool):
                fn["strict"] = tool["strict"]
            out.append({"type": "function", "function": fn})
        elif kind == "custom":
            desc = str(tool.get("description") or "")
            fmt = tool.get("format")
            if isinstance(fmt, dict) and fmt.get("type") == "grammar" and isinstance(fmt.get("definition"), str):
                desc += (f"\n\nThe input must follow this {fmt.get('syntax') or 'grammar'} grammar:\n"
                         f"{fmt['definition']}")
            custom.add(tool["name"])
            out.append({"type": "function", "function": {"name": tool["name"], "description": desc.strip(),
                                                         "parameters": _CUSTOM_PARAMETERS}})
        else:
            dropped.append(kind[:40])
    if dropped:
        notes.append(f"built-in tools dropped on translated steps: {', '.join(dict.fromkeys(dropped))}")
    return out, frozenset(custom)


def _tool_choice(choice: Any) -> Any:
    """A Responses tool_choice in chat's terms; None: leave it out (chat's default, auto)."""
    if isinstance(choice, str):
        return choice
    kind = choice.get("type")
    if kind in ("function", "custom") and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    if kind == "allowed_tools" and isinstance(choice.get("tools"), list):
        names = [t["name"] for t in choice["tools"] if isinstance(t, dict) and t.get("type") in ("function", "custom")
                 and isinstance(t.get("name"), str)]
        if names:
            return {"type": "allowed_tools", "allowed_tools": {
                "mode": "required" if choice.get("mode") == "required" else "auto",
                "tools": [{"type": "function", "function": {"name": n}} for n in names]}}
    return None  # a built-in tool's choice: it was dropped with its tool


def to_chat(body: dict[str, Any], items: list[dict[str, Any]], notes: list[str]) -> tuple[dict[str, Any],
                                                                                         frozenset[str]]:
    """The internal chat body for ``body`` whose whole context is ``items``; and the custom tools' names."""
    messages = _messages(items, notes)
    instructions = body.get("instructions")
    if instructions:
        messages.insert(0, {"role": "system", "content": instructions})
    if not messages:
        raise _bad("'input' is required: a string, or a list of input items", "input")
    chat: dict[str, Any] = {"model": body["model"], "messages": messages}
    if body.get("stream"):
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}  # translated steps then give the usage chunk
    tools, custom = _tools(body.get("tools") or [], notes)
    if tools:
        chat["tools"] = tools
        choice = body.get("tool_choice")
        if choice is not None and (mapped := _tool_choice(choice)) is not None:
            chat["tool_choice"] = mapped
        if isinstance(body.get("parallel_tool_calls"), bool):
            chat["parallel_tool_calls"] = body["parallel_tool_calls"]
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    for name in ("temperature", "top_p"):
        if isinstance(body.get(name), (int, float)) and not isinstance(body[name], bool):
            chat[name] = body[name]
    for name in _STR_FIELDS:
        if isinstance(body.get(name), str):
            chat[name] = body[name]
    effort = (body.get("reasoning") or {}).get("effort")
    if isinstance(effort, str):
        chat["reasoning_effort"] = effort
    text = body.get("text") or {}
    fmt = text.get("format")
    if isinstance(fmt, dict) and fmt["type"] == "json_object":
        chat["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict) and fmt["type"] == "json_schema":
        schema: dict[str, Any] = {"name": fmt["name"], "schema": fmt["schema"]}
        for k in ("strict", "description"):
            if fmt.get(k) is not None:
                schema[k] = fmt[k]
        chat["response_format"] = {"type": "json_schema", "json_schema": schema}
    if isinstance(text.get("verbosity"), str):
        chat["verbosity"] = text["verbosity"]
    return chat, custom


def _ours(item: dict[str, Any]) -> bool:
    """Whether a reasoning item's id is one the gateway minted (``rs_atg_...``)."""
    rid = item.get("id")
    return isinstance(rid, str) and rid.startswith(GATEWAY_REASONING)


def _as_input(item: dict[str, Any]) -> dict[str, Any]:
    """A kept item as the next turn's input: without the id we gave it (an upstream would look an unknown id
    up and refuse it); reasoning items keep theirs (the upstream's need it; ours mark them, see _for_native)."""
    if item.get("type") == "reasoning" or "id" not in item:
        return item
    return {k: v for k, v in item.items() if k != "id"}


def _for_native(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Input items as a native (Responses) step gets them: without the reasoning items the gateway made (a
    translated step's thinking as text, or a client's reasoning item that had no id). No Responses upstream
    knows their ids and it refuses the whole request for them (400 item_not_found); a translated step drops
    every reasoning item anyway."""
    return [i for i in items if i.get("type") != "reasoning" or not _ours(i)]


def _with_id(item: dict[str, Any]) -> dict[str, Any]:
    """An input item as kept: with an id (``input_items`` lists items by id)."""
    if isinstance(item.get("id"), str):
        return item
    return {**item, "id": _new_id(_ID_PREFIX.get(str(item.get("type", "message")), "item_"))}


# -- the answer ----------------------------------------------------------------------------------------------

def _usage(u: Any) -> dict[str, Any]:
    """Chat usage (OpenAI form) as Responses usage."""
    u = u if isinstance(u, dict) else {}
    prompt, completion = _int(u.get("prompt_tokens")), _int(u.get("completion_tokens"))
    pd = u.get("prompt_tokens_details") if isinstance(u.get("prompt_tokens_details"), dict) else {}
    cd = u.get("completion_tokens_details") if isinstance(u.get("completion_tokens_details"), dict) else {}
    writes = _int(pd.get("cache_write_tokens")) or _int(pd.get("cache_creation_tokens"))
    return {"input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": _int(pd.get("cached_tokens")), "cache_write_tokens": writes},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": _int(cd.get("reasoning_tokens"))},
            "total_tokens": _int(u.get("total_tokens")) or prompt + completion}


def _ending(finish: Any) -> tuple[str, dict[str, Any] | None]:
    """A chat finish_reason as the response's status and incomplete_details."""
    if finish == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    if finish == "content_filter":
        return "incomplete", {"reason": "content_filter"}
    return "completed", None


def _unwrap_custom(arguments: str) -> str:
    """A custom tool's input from the one-argument function it was sent as."""
    try:
        args = json.loads(arguments)
    except ValueError:
        return arguments
    if isinstance(args, dict) and isinstance(args.get("input"), str):
        return args["input"]
    return arguments


def _call_item(call_id: str, name: str, arguments: str, custom: frozenset[str], item_id: str | None = None
               ) -> dict[str, Any]:
    if name in custom:
        return {"id": item_id or _new_id("ctc_"), "type": "custom_tool_call", "call_id": call_id, "name": name,
                "input": _unwrap_custom(arguments)}
    return {"id": item_id or _new_id("fc_"), "type": "function_call", "status": "completed", "call_id": call_id,
            "name": name, "arguments": arguments}


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "annotations": [], "logprobs": [], "text": text}


def _reasoning_item(item_id: str, text: str) -> dict[str, Any]:
    return {"id": item_id, "type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": text}]}


def output_items(message: dict[str, Any], status: str, custom: frozenset[str]) -> list[dict[str, Any]]:
    """A chat completion's message as Responses output items."""
    out: list[dict[str, Any]] = []
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    if isinstance(reasoning, str) and reasoning:
        out.append(_reasoning_item(_new_id(GATEWAY_REASONING), reasoning))
    parts = []
    if isinstance(message.get("content"), str) and message["content"]:
        parts.append(_text_part(message["content"]))
    if isinstance(message.get("refusal"), str) and message["refusal"]:
        parts.append({"type": "refusal", "refusal": message["refusal"]})
    if parts:
        out.append({"id": _new_id("msg_"), "type": "message", "status": status, "role": "assistant",
                    "content": parts})
    for tc in message.get("tool_calls") or []:
        fn = tc.get("function") if isinstance(tc, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            args = fn.get("arguments")
            out.append(_call_item(str(tc.get("id") or _new_id("call_")), fn["name"],
                                  args if isinstance(args, str) else "", custom))
    return out


def failure_code(error: dict[str, Any], upstream: dict[str, Any] | None = None, status: int | None = None) -> str:
    """The ``error.code`` of ``response.failed``: the upstream's own when it is one a Responses client knows,
    else what the status stands for."""
    for code in ((upstream or {}).get("code"), error.get("code")):
        if code in _FAILURE_CODES:
            return str(code)
    status = status or (error.get("status") if type(error.get("status")) is int else None)
    message = str(error.get("message") or "") + " " + str((upstream or {}).get("message") or "")
    if status == 429:
        return "rate_limit_exceeded"
    if status == 402:
        return "insufficient_quota"
    if status is not None and 400 <= status < 500:
        return "context_length_exceeded" if _CONTEXT_HINT.search(message) else "invalid_prompt"
    return "server_error"


# -- streams --------------------------------------------------------------------------------------------------

def _another_call(item: Any, call_id: str, name: str) -> bool:
    """Whether a tool-call fragment (its ``id`` and ``function.name``, "" when absent) belongs to another call
    than the one open at its index: another id (ids decide when both have one), else another name."""
    if call_id and item.call_id:
        return bool(call_id != item.call_id)
    return bool(name and item.name and name != item.name)


class _Item:
    """The output item a translated stream has open: a message's text, reasoning, or a tool call."""

    __slots__ = ("kind", "id", "index", "parts", "call_id", "name", "announced", "part", "content")

    def __init__(self, kind: str, item_id: str, index: int) -> None:
        self.kind = kind  # "message", "reasoning", "function_call", "custom_tool_call"
        self.id = item_id
        self.index = index
        self.parts: list[str] = []  # the open content part's text (a tool call's arguments), in pieces
        self.call_id = ""
        self.name = ""
        self.announced = False  # a tool call's output_item.added is sent once its name is known
        self.part = ""  # a message's open content part: "output_text", "refusal" or "" (none)
        self.content: list[dict[str, Any]] = []  # a message's finished content parts


class _Renderer(StreamRenderer):
    """What both stream renderers share: sequence numbers, the final response (kept by ``ResponsesCall._kept``),
    ``response.failed``."""

    def __init__(self, call: ResponsesCall, model: str) -> None:
        self.call = call
        self.model = model
        self.seq = 0
        self.final: dict[str, Any] | None = None  # the response object of the closing event, once known
        self.split = EventSplitter()

    def event(self, out: list[bytes], name: str, fields: dict[str, Any]) -> None:
        out.append(sse(name, {"type": name, **fields, "sequence_number": self.seq}))
        self.seq += 1

    def response(self, status: str, **fields: Any) -> dict[str, Any]:
        return {**self.call.head, "model": self.model, "status": status, **fields}

    def failed(self, out: list[bytes], error: dict[str, Any], **fields: Any) -> bytes:
        inner = error.get("error")
        err: dict[str, Any] = inner if isinstance(inner, dict) else error
        code = str(err["code"]) if err.get("code") in _FAILURE_CODES else failure_code(err)
        message = str(err.get("message") or "the upstream stream failed")
        if code == "rate_limit_exceeded" and "try again in" not in message:
            m = _RETRY_IN.search(message)
            if m:
                message += f" Please try again in {m.group(1)}s."
        self.event(out, "response.failed", {"response": self.response(
            "failed", error={"code": code, "message": message}, **fields)})
        return b"".join(out)


class _Translated(_Renderer):
    """OpenAI chat chunks as Responses events (one step's stream)."""

    def __init__(self, call: ResponsesCall, model: str) -> None:
        super().__init__(call, model)
        self.started = False
        self.closed: list[tuple[int, dict[str, Any]]] = []  # (output_index, item) as each was finished
        self.open: _Item | None = None  # the text or reasoning item being streamed
        # Tool calls being streamed, by their chat index: several may be open at once (an upstream may
        # interleave their fragments); they are finished when text starts again, or at the end. A chat index
        # may carry a second call (an upstream that sends each call whole at index 0, with its own id):
        # ``calls`` is by the call's own number, ``slots`` the chat index's current call.
        self.calls: dict[int, _Item] = {}
        self.slots: dict[int, int] = {}
        self.finished_slots: set[int] = set()
        self.last_slot: int | None = None  # the chat index of the last fragment (where index null goes on)
        self.next_index = 0
        self.usage: Any = None
        self.finish: Any = None

    def _start(self, out: list[bytes]) -> None:
        self.started = True
        self.event(out, "response.created", {"response": self.response("in_progress", output=[], usage=None)})
        self.event(out, "response.in_progress", {"response": self.response("in_progress", output=[], usage=None)})

    def feed(self, chunk: bytes) -> bytes:
        out: list[bytes] = []
        if not self.started:
            self._start(out)
        for ev in self.split.feed(chunk):
            data = event_data(ev)
            if not data or data == b"[DONE]":
                continue
            try:
                obj = json.loads(data)
            except ValueError:
                continue  # adapters send JSON; anything else is not ours to fail on
            if not isinstance(obj, dict):
                continue
            if isinstance(obj.get("usage"), dict):
                self.usage = obj["usage"]
            for choice in obj.get("choices") or ():
                if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                    continue
                delta = choice.get("delta")
                if isinstance(delta, dict):
                    self._delta(out, delta)
                if choice.get("finish_reason"):
                    self.finish = choice["finish_reason"]
        return b"".join(out)

    def _delta(self, out: list[bytes], delta: dict[str, Any]) -> None:
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        if isinstance(reasoning, str) and reasoning:
            item = self._item(out, "reasoning", GATEWAY_REASONING)
            item.parts.append(reasoning)
            self.event(out, "response.reasoning_text.delta", {"item_id": item.id, "output_index": item.index,
                                                              "content_index": 0, "delta": reasoning})
        content = delta.get("content")
        if isinstance(content, str) and content:
            item = self._item(out, "message", "msg_")
            if item.part != "output_text":
                self._part(out, item, "output_text")
            item.parts.append(content)
            self.event(out, "response.output_text.delta", {"item_id": item.id, "output_index": item.index,
                                                           "content_index": len(item.content), "delta": content,
                                                           "logprobs": []})
        refusal = delta.get("refusal")
        if isinstance(refusal, str) and refusal:  # the message's refusal part, as OpenAI streams one
            item = self._item(out, "message", "msg_")
            if item.part != "refusal":
                self._part(out, item, "refusal")
            item.parts.append(refusal)
            self.event(out, "response.refusal.delta", {"item_id": item.id, "output_index": item.index,
                                                       "content_index": len(item.content), "delta": refusal})
        calls = delta.get("tool_calls")
        if isinstance(calls, list):
            for tc in calls:
                if isinstance(tc, dict):
                    self._tool_delta(out, tc)

    @property
    def output(self) -> list[dict[str, Any]]:
        return [item for _, item in sorted(self.closed, key=lambda pair: pair[0])]

    def _item(self, out: list[bytes], kind: str, prefix: str) -> _Item:
        """The open text or reasoning item of ``kind``, opened now (finishing what is open) when there is none."""
        item = self.open
        if item is not None and item.kind == kind:
            return item
        self._close(out)
        item = self.open = _Item(kind, _new_id(prefix), self.next_index)
        self.next_index += 1
        if kind == "message":  # its content parts are opened by what comes (_part)
            self.event(out, "response.output_item.added", {"output_index": item.index, "item": {
                "id": item.id, "type": "message", "status": "in_progress", "content": [], "role": "assistant"}})
        else:
            self.event(out, "response.output_item.added", {"output_index": item.index, "item": {
                "id": item.id, "type": "reasoning", "summary": [], "content": []}})
            self.event(out, "response.content_part.added", {"item_id": item.id, "output_index": item.index,
                                                            "content_index": 0,
                                                            "part": {"type": "reasoning_text", "text": ""}})
        return item

    def _part(self, out: list[bytes], item: _Item, kind: str) -> None:
        """Open a content part of ``kind`` (output_text, refusal) in the message, finishing the open one."""
        self._end_part(out, item)
        item.part = kind
        self.event(out, "response.content_part.added", {
            "item_id": item.id, "output_index": item.index, "content_index": len(item.content),
            "part": _text_part("") if kind == "output_text" else {"type": "refusal", "refusal": ""}})

    def _end_part(self, out: list[bytes], item: _Item) -> None:
        if not item.part:
            return
        text = "".join(item.parts)
        where = {"item_id": item.id, "output_index": item.index, "content_index": len(item.content)}
        if item.part == "output_text":
            part = _text_part(text)
            self.event(out, "response.output_text.done", {**where, "text": text, "logprobs": []})
        else:
            part = {"type": "refusal", "refusal": text}
            self.event(out, "response.refusal.done", {**where, "refusal": text})
        self.event(out, "response.content_part.done", {**where, "part": part})
        item.content.append(part)
        item.part, item.parts = "", []

    def _tool_delta(self, out: list[bytes], tc: dict[str, Any]) -> None:
        fn: dict[str, Any] = tc["function"] if isinstance(tc.get("function"), dict) else {}
        call_id = tc["id"] if isinstance(tc.get("id"), str) else ""
        name = fn["name"] if isinstance(fn.get("name"), str) else ""
        index = tc.get("index", 0)
        if index is None:  # not conformant: the last call's index if the fragment may be its rest, else the next free
            last = self._slot_call(self.last_slot)
            if last is None or _another_call(last, call_id, name):
                index = max((*self.slots, *self.finished_slots), default=-1) + 1
            else:
                index = self.last_slot
        elif not isinstance(index, int) or isinstance(index, bool):
            return
        self.last_slot = index
        item = self._slot_call(index)
        if item is not None and _another_call(item, call_id, name):
            item = None  # another call on the same index: its own item (names and arguments are never joined)
        if item is None:
            if not (call_id or name) and index in self.finished_slots:
                return  # a fragment of a call finished before text came again: nothing can carry it now
            self._close_text(out)
            item = self.calls[self.next_index] = _Item("function_call", "", self.next_index)
            self.slots[index] = self.next_index
            self.next_index += 1
        if call_id and not item.call_id:
            item.call_id = call_id
        if name and not item.name:
            item.name = name
        if isinstance(fn.get("arguments"), str) and fn["arguments"]:
            item.parts.append(fn["arguments"])
            if item.announced and item.kind == "function_call":
                self.event(out, "response.function_call_arguments.delta", {
                    "item_id": item.id, "output_index": item.index, "delta": fn["arguments"]})
        if not item.announced and item.name:
            self._announce(out, item)

    def _slot_call(self, index: int | None) -> _Item | None:
        """The open call of a chat index."""
        key = self.slots.get(index) if index is not None else None
        return self.calls.get(key) if key is not None else None

    def _announce(self, out: list[bytes], item: _Item) -> None:
        item.announced = True
        item.call_id = item.call_id or _new_id("call_")
        if item.name in self.call.custom:
            item.kind, item.id = "custom_tool_call", _new_id("ctc_")
            self.event(out, "response.output_item.added", {"output_index": item.index, "item": {
                "id": item.id, "type": "custom_tool_call", "call_id": item.call_id, "name": item.name, "input": ""}})
            return
        item.id = _new_id("fc_")
        self.event(out, "response.output_item.added", {"output_index": item.index, "item": {
            "id": item.id, "type": "function_call", "status": "in_progress", "call_id": item.call_id,
            "name": item.name, "arguments": ""}})
        if item.parts:  # arguments that came before the name
            self.event(out, "response.function_call_arguments.delta", {
                "item_id": item.id, "output_index": item.index, "delta": "".join(item.parts)})

    def _close(self, out: list[bytes]) -> None:
        """Finish everything open: the text or reasoning item, then the tool calls (in their order)."""
        self._close_text(out)
        for item in sorted(self.calls.values(), key=lambda item: item.index):
            self._finish(out, item)
        self.finished_slots.update(self.slots)
        self.slots.clear()
        self.calls.clear()

    def _close_text(self, out: list[bytes]) -> None:
        item, self.open = self.open, None
        if item is not None:
            self._finish(out, item)

    def _finish(self, out: list[bytes], item: _Item) -> None:
        text = "".join(item.parts)
        if item.kind == "message":
            status, _ = _ending(self.finish)
            self._end_part(out, item)
            done: dict[str, Any] = {"id": item.id, "type": "message", "status": status, "content": item.content,
                                    "role": "assistant"}
        elif item.kind == "reasoning":
            self.event(out, "response.reasoning_text.done", {"item_id": item.id, "output_index": item.index,
                                                             "content_index": 0, "text": text})
            self.event(out, "response.content_part.done", {"item_id": item.id, "output_index": item.index,
                                                           "content_index": 0,
                                                           "part": {"type": "reasoning_text", "text": text}})
            done = _reasoning_item(item.id, text)
        else:
            if not item.announced:
                item.name = item.name or "unknown"  # an upstream that never named its call
                self._announce(out, item)
            done = _call_item(item.call_id, item.name, text, self.call.custom, item.id)
            if done["type"] == "custom_tool_call":
                if done["input"]:
                    self.event(out, "response.custom_tool_call_input.delta", {
                        "item_id": item.id, "output_index": item.index, "delta": done["input"]})
                self.event(out, "response.custom_tool_call_input.done", {
                    "item_id": item.id, "output_index": item.index, "input": done["input"]})
            else:
                self.event(out, "response.function_call_arguments.done", {
                    "item_id": item.id, "output_index": item.index, "arguments": text})
        self.closed.append((item.index, done))
        self.event(out, "response.output_item.done", {"output_index": item.index, "item": done})

    def close(self) -> bytes:
        out: list[bytes] = []
        if not self.started:
            self._start(out)
        self._close(out)
        status, incomplete = _ending(self.finish)
        final = self.final = self.response(status, output=self.output, usage=_usage(self.usage),
                                           incomplete_details=incomplete, completed_at=int(time.time()))
        self.event(out, "response.completed" if status == "completed" else "response.incomplete",
                   {"response": final})
        return b"".join(out)

    def fail(self, error: dict[str, Any]) -> bytes:
        out: list[bytes] = []
        if not self.started:
            self._start(out)
        return self.failed(out, error, output=self.output,
                           usage=_usage(self.usage) if self.usage is not None else None)


class _Native(_Renderer):
    """A Responses upstream's own events, passed through; its closing event is held back until the response
    is kept (``ResponsesCall._kept``), and a break ends with ``response.failed`` under the upstream's id."""

    def __init__(self, call: ResponsesCall, model: str) -> None:
        super().__init__(call, model)
        self.held = b""
        self.id: str | None = None

    def feed(self, chunk: bytes) -> bytes:
        if (self.id is not None and not self.split.pending and chunk.endswith(b"\n\n")
                and b"response.completed" not in chunk and b"response.incomplete" not in chunk):
            self._count(chunk)
            return chunk  # the common chunk: whole events, nothing to look at
        out: list[bytes] = []
        for ev in self.split.feed(chunk):
            closing = b"response.completed" in ev or b"response.incomplete" in ev
            if self.id is None or closing:
                obj = self._decode(ev)
                resp = obj.get("response") if isinstance(obj.get("response"), dict) else None
                if self.id is None and resp is not None and isinstance(resp.get("id"), str):
                    self.id = resp["id"]
                if obj.get("type") in ("response.completed", "response.incomplete") and resp is not None:
                    self.final = resp
                    self.held += ev
                    continue
            self._count(ev)
            out.append(ev)
        return b"".join(out)

    @staticmethod
    def _decode(ev: bytes) -> dict[str, Any]:
        try:
            obj = json.loads(event_data(ev) or b"null")
        except ValueError:
            return {}
        return obj if isinstance(obj, dict) else {}

    def _count(self, data: bytes) -> None:
        found = _SEQ.findall(data)
        if found:
            self.seq = int(found[-1]) + 1

    def close(self) -> bytes:
        return self.held

    def fail(self, error: dict[str, Any]) -> bytes:
        head = {"id": self.id} if self.id else {}
        return self.failed([], error, output=[], usage=None, **head)


# -- the call and the door ------------------------------------------------------------------------------------

class ResponsesCall(Call):
    """One ``POST /v1/responses``: the chat body and the door's body, plus what keeping the answer needs."""

    def __init__(self, door: ResponsesDoor, model: str, chat: dict[str, Any], *, native: dict[str, Any],
                 stream: bool, headers: Headers, head: dict[str, Any], custom: frozenset[str],
                 context: list[dict[str, Any]], store: ResponseStore | None = None, key_id: str = "",
                 retention: float = 86400.0) -> None:
        super().__init__(door, model, chat, native=native, stream=stream, headers=headers)
        self.head = head  # the response object's fields that echo the request
        self.custom = custom  # names of the custom tools (their calls come back as custom_tool_call)
        self.context = context  # the whole input, as kept (earlier turns first)
        self.store = store  # None: nothing is kept (no store file, or store: false)
        self.key_id = key_id
        self.retention = retention
        self.rendered: tuple[bytes, dict[str, Any]] | None = None  # the last translated answer and its object
        self.ctx: RequestContext | None = None

    def _fields_for(self, adapter: Provider, prepared: dict[str, Any], step: Step) -> None:
        if (adapter.type_name in _COMPLETION_TOKENS_TYPES and "max_tokens" in prepared
                and _COMPLETION_TOKENS_MODEL.match(step.model) is not None):
            prepared["max_completion_tokens"] = prepared.pop("max_tokens")

    async def complete(self, adapter: Provider, prepared: dict[str, Any], step: Step) -> Completion:
        self._fields_for(adapter, prepared, step)
        return await super().complete(adapter, prepared, step)

    def open(self, adapter: Provider, prepared: dict[str, Any], step: Step, state: StreamState) -> DoorStream:
        if self.is_native(adapter, step):
            inner = adapter.stream_native(NATIVE_OP, self.native_body(step), step, state, self.headers)
            return DoorStream(inner, _Native(self, step.model), self._kept)
        self._fields_for(adapter, prepared, step)
        return DoorStream(adapter.stream(prepared, step, state), _Translated(self, step.model), self._kept)

    def error(self, agen: Any, error: dict[str, Any]) -> bytes:
        """``response.failed``, its code from what the upstream said when routing knows it (the attempts)."""
        err = dict(error.get("error") or {})
        attempts = self.ctx.attempts if self.ctx is not None else []
        failed = next((a for a in reversed(attempts) if not a.ok or a.error), None)
        err["code"] = failure_code(err, failed.upstream_error if failed else None,
                                   failed.status if failed and failed.status and failed.status >= 400 else None)
        return super().error(agen, {"error": err})

    async def _kept(self, renderer: Any) -> None:
        """A stream's clean end: its final response is kept before its closing event goes out."""
        final = getattr(renderer, "final", None)
        if final is not None:
            await self.keep(final)

    async def keep(self, response: dict[str, Any]) -> None:
        """Keep the answer for previous_response_id and GET (when the request is to be kept); a failing write
        is logged, never the client's failure."""
        store = self.store
        rid = response.get("id")
        if store is None or not isinstance(rid, str):
            return
        output = response.get("output")
        if not isinstance(output, list):
            output = []
        try:
            await store.put(rid, self.key_id, self.context, output, response, self.retention)
        except Exception as exc:
            log.warning("could not keep response %s (a follow-up naming it will not find it): %s",
                        rid[:64], exc.__class__.__name__ + (f": {exc}" if str(exc) else ""))


class ResponsesDoor(Door):
    name = "responses"
    native_op = NATIVE_OP

    # -- POST /v1/responses -------------------------------------------------------------------------------
    def parse(self, request: Request, decode: Any) -> Call:
        """The request as a Call, without kept responses (``serve`` adds them)."""
        body = self._body(request, decode)
        if body.get("previous_response_id") is not None:
            raise self._no_store("previous_response_id")
        return self._call(body, [], request, None, "", 86400.0)

    @staticmethod
    def _body(request: Request, decode: Any) -> dict[str, Any]:
        body = decode(request.body)
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object", code="invalid_json")
        check(body)
        return body

    @staticmethod
    def _no_store(param: str) -> BadRequest:
        return _bad("responses are not kept by this gateway (its store is in memory): previous_response_id and "
                    "GET/DELETE /v1/responses/{id} need a store file (set store.path); or send the whole "
                    "conversation in 'input'", param, "store_in_memory")

    def _call(self, body: dict[str, Any], kept: list[dict[str, Any]], request: Request,
              store: ResponseStore | None, key_id: str, retention: float) -> ResponsesCall:
        """``kept``: the context of the response named by previous_response_id (its input, then its output)."""
        notes: list[str] = []
        own = input_items(body)
        prior = [_as_input(i) for i in kept]
        chat, custom = to_chat(body, [*prior, *own], notes)
        native = dict(body)
        if kept:  # the upstream gets the whole context; it is never asked for a response it may not have
            native["input"] = _for_native([*prior, *own])
            native.pop("previous_response_id", None)
        elif isinstance(body.get("input"), list) and len(mine := _for_native(own)) < len(own):
            native["input"] = mine  # the client resent them itself
        keep = store is not None and body.get("store") is not False
        reasoning = body.get("reasoning") or {}
        text = body.get("text") or {}
        head = {
            "id": _new_id("resp_"), "object": "response", "created_at": int(time.time()), "background": False,
            "error": None, "incomplete_details": None, "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"), "max_tool_calls": body.get("max_tool_calls"),
            "metadata": body.get("metadata") or {},
            "parallel_tool_calls": body["parallel_tool_calls"] if isinstance(body.get("parallel_tool_calls"), bool)
            else True,
            "previous_response_id": body.get("previous_response_id"),
            "prompt_cache_key": body.get("prompt_cache_key"),
            "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")},
            "safety_identifier": body.get("safety_identifier"), "service_tier": body.get("service_tier") or "default",
            "temperature": body.get("temperature", 1.0),
            "text": {"format": text.get("format") or {"type": "text"}, "verbosity": text.get("verbosity", "medium")},
            "tool_choice": body.get("tool_choice") or "auto", "tools": body.get("tools") or [],
            "top_p": body.get("top_p", 1.0), "truncation": body.get("truncation") or "disabled",
            "user": body.get("user"),
        }
        beta = request.header(b"openai-beta")
        call = ResponsesCall(self, body["model"], chat, native=native, stream=bool(body.get("stream")),
                             headers=[(b"openai-beta", beta)] if beta else [], head=head, custom=custom,
                             context=[*kept, *(_with_id(i) for i in own)] if keep else [],
                             store=store if keep else None, key_id=key_id, retention=retention)
        call.notes = list(dict.fromkeys(notes))
        return call

    async def serve(self, gateway: Any, ctx: RequestContext, request: Request, responder: Responder,
                    op: str) -> None:
        if op == "item":
            await self._item(gateway, ctx, request, responder)
            return
        body = self._body(request, gateway.decode_body)
        store: ResponseStore | None = getattr(gateway.services, "responses", None)
        context: list[dict[str, Any]] = []
        prev = body.get("previous_response_id")
        if prev is not None:
            if store is None:
                raise self._no_store("previous_response_id")
            kept = await store.get(prev, ctx.client)
            if kept is None:
                raise _bad(f"Previous response with id {prev[:100]!r} not found (it expired, was deleted, was "
                           "made with store: false or by another key).", "previous_response_id",
                           "previous_response_not_found")
            context = [i for i in (*kept.input, *kept.output) if isinstance(i, dict)]
        call = self._call(body, context, request, store, ctx.client, gateway.config.response_retention)
        call.ctx = ctx
        if call.notes:  # they are about translated steps: a route that only has native ones loses nothing
            route = gateway.config.routes.get(call.model)
            providers = gateway.providers
            if route is not None and all(s.provider in providers and providers[s.provider].native(NATIVE_OP, s)
                                         for s in route.steps):
                call.notes = []
        await gateway.run_call(ctx, call, responder)

    def constrain(self, call: Call, system_prompt: str | None, max_tokens: int | None) -> None:
        """A key's rules on the native body: its system prompt as the first input item (``instructions`` would
        be echoed back to the client in the response object), its cap on ``max_output_tokens``, never below
        the API's minimum of 16 (it refuses less; translated steps onto a Responses upstream get the same
        floor, ``MIN_OUTPUT_TOKENS``): a key capped at 8 gets answers of up to 16 tokens there."""
        body = call.native
        if body is None:
            return
        if system_prompt:
            inp = body.get("input")
            items = input_items({"input": inp}) if inp is not None else []
            body["input"] = [{"type": "message", "role": "system", "content": system_prompt}, *items]
        if max_tokens is not None:
            value = body.get("max_output_tokens")
            capped = value if type(value) is int and value <= max_tokens else max_tokens
            body["max_output_tokens"] = max(capped, MIN_OUTPUT_TOKENS)

    def render(self, call: Call, done: Completion, step: Step) -> bytes:
        assert isinstance(call, ResponsesCall)
        obj = json.loads(done.body)
        choice = (obj.get("choices") or [{}])[0]
        message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
        status, incomplete = _ending(choice.get("finish_reason"))
        model = obj.get("model") if isinstance(obj.get("model"), str) else step.model
        response = {**call.head, "model": model, "status": status, "incomplete_details": incomplete,
                    "output": output_items(message, status, call.custom), "usage": _usage(obj.get("usage")),
                    "completed_at": int(time.time())}
        body = dumps(response)
        call.rendered = (body, response)
        return body

    def renderer(self, call: Call, step: Step | None, native: bool) -> StreamRenderer:
        assert isinstance(call, ResponsesCall)
        model = step.model if step is not None else call.model
        return _Native(call, model) if native else _Translated(call, model)

    async def finished(self, gateway: Any, ctx: RequestContext, call: Call, body: bytes) -> None:
        """Keep a whole answer before it is sent (the gateway awaits this first)."""
        if not isinstance(call, ResponsesCall) or call.store is None:
            return
        if call.rendered is not None and call.rendered[0] is body:
            response = call.rendered[1]
        else:  # a native step's answer
            try:
                response = json.loads(body)
            except ValueError:
                return
            if not isinstance(response, dict):
                return
        await call.keep(response)

    # -- GET / DELETE /v1/responses/{id}[/input_items] ----------------------------------------------------
    async def _item(self, gateway: Any, ctx: RequestContext, request: Request, responder: Responder) -> None:
        rest = request.path.partition(b"/responses/")[2]
        raw_id, _, sub = rest.partition(b"/")
        try:
            rid = unquote_to_bytes(raw_id).decode("utf-8")
        except UnicodeDecodeError:
            rid = ""
        delete = request.method == b"DELETE"
        if not rid or sub not in (b"", b"input_items") or (sub and delete):
            shown = request.path.decode("latin-1")[:200]
            raise NotFound(f"no such endpoint: {request.method.decode('latin-1')} {shown}", code="unknown_url")
        store: ResponseStore | None = getattr(gateway.services, "responses", None)
        if store is None:
            raise self._no_store("response_id")
        gone = NotFound(f"No response with id {rid[:100]!r} found (it expired, was deleted, was made with "
                        "store: false or by another key).", code="response_not_found", extra={"param": "response_id"})
        if delete:
            if not await store.delete(rid, ctx.client):
                raise gone
            answer: Any = {"id": rid, "object": "response", "deleted": True}
        else:
            kept = await store.get(rid, ctx.client)
            if kept is None:
                raise gone
            answer = kept.response if not sub else self._listing(kept.input, request.query)
        limiter = gateway.services.limiter
        if ctx.key is not None and limiter is not None:
            await limiter.peek(ctx)  # the x-ratelimit-* headers of every answer to a limited key
        ctx.status = 200
        await responder.send(200, [self.content_type, *ctx.gateway_headers()], dumps(answer))

    @staticmethod
    def _listing(items: list[Any], query: bytes) -> dict[str, Any]:
        """``input_items``: OpenAI's list (newest first unless ``order=asc``; ``limit`` 1..100, default 20;
        ``after`` an item id)."""
        params: dict[str, str] = {}
        for pair in query.split(b"&"):
            k, _, v = pair.partition(b"=")
            params[unquote_to_bytes(k).decode("utf-8", "replace")] = unquote_to_bytes(v).decode("utf-8", "replace")
        try:
            limit = min(100, max(1, int(params.get("limit", "20"))))
        except ValueError:
            raise _bad("'limit' must be a whole number from 1 to 100", "limit") from None
        order = params.get("order", "desc")
        if order not in ("asc", "desc"):
            raise _bad("'order' must be asc or desc", "order")
        data = [i for i in items if isinstance(i, dict)]
        if order == "desc":
            data.reverse()
        after = params.get("after")
        if after:
            ids = [i.get("id") for i in data]
            data = data[ids.index(after) + 1:] if after in ids else []
        page = data[:limit]
        return {"object": "list", "data": page, "first_id": page[0].get("id") if page else None,
                "last_id": page[-1].get("id") if page else None, "has_more": len(data) > limit}


__all__ = ["ResponsesCall", "ResponsesDoor", "check", "failure_code", "input_items", "output_items", "to_chat"]

