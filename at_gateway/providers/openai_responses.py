"""``type: openai`` with ``wire_api: responses``: an upstream that speaks OpenAI's Responses API.

API followed: ``POST {base_url}/responses`` (OpenAI's Responses API as its reference and the ``openai``
SDK's types describe it): a ``response`` object back, or with ``stream: true`` SSE events named by
``event:`` lines, each with a ``sequence_number``, ending with ``response.completed`` (or
``response.incomplete``); a failure mid-way is ``response.failed`` (its ``response.error.code``:
``rate_limit_exceeded``, ``insufficient_quota``, ``server_error``, ``context_length_exceeded``, ...) or an
``error`` event. Errors before the answer are OpenAI's usual ``{"error": {...}}`` bodies.

Native (the Responses front door, op ``responses``): the door's body goes as it is (only ``model``
rewritten by the door), the answer's bytes and stream events come back unchanged; usage is read from
the ``response`` object (``response.completed``) and mapped to the chat form accounting reads.

Chat completions onto it (every other door), translated:

* ``system``/``developer`` messages -> input messages of that role, where they are (Responses keeps the
  role; ``instructions`` would lose both the role and the position); ``user`` -> input messages (text ->
  ``input_text``, ``image_url`` -> ``input_image`` with its ``detail``, ``file`` -> ``input_file``);
  ``assistant`` text -> an assistant message, its ``tool_calls`` -> ``function_call`` items, ``tool``
  messages -> ``function_call_output`` items (ids kept, so calls and outputs pair up).
* ``tools`` (functions) -> flat function tools with ``strict`` always sent (``false`` unless the client
  asked for strict: the Responses API makes an omitted ``strict`` strict, which would turn optional
  parameters into required ones); ``tool_choice`` (``auto``/``none``/``required``, a named function,
  ``allowed_tools``) and ``parallel_tool_calls`` likewise.
* ``response_format`` -> ``text.format`` (``json_schema``, ``json_object``, ``text``); ``verbosity`` ->
  ``text.verbosity``; ``reasoning_effort`` -> ``reasoning.effort``; ``max_completion_tokens`` /
  ``max_tokens`` -> ``max_output_tokens``, raised to 16 (the API's minimum: a chat client's
  ``max_tokens: 1`` probe must not fail); ``temperature``, ``top_p``, ``user``, ``safety_identifier``,
  ``prompt_cache_key``, ``prompt_cache_retention``, ``metadata``, ``service_tier`` as they are;
  ``store: false`` always (the gateway keeps nothing upstream on a client's behalf).
* Refused with a 400 failed step (the route falls through): ``n`` > 1, audio in or out, legacy
  ``functions``/``function`` messages, non-function tools. Ignored: ``stop`` (the Responses API has
  none), penalties, ``seed``, ``logit_bias``, ``logprobs``, ``stream_options`` (usage always comes).

Answers: ``output_text`` parts -> ``content``, ``refusal`` parts -> ``refusal``, reasoning summaries ->
``reasoning_content``, ``function_call`` items -> ``tool_calls``; status ``completed`` -> ``stop`` (or
``tool_calls``), ``incomplete`` -> ``length`` (``content_filter`` when that was the reason); usage ->
``prompt_tokens`` (cached tokens in ``prompt_tokens_details``), ``completion_tokens`` (reasoning tokens in
``completion_tokens_details``). Streams become chunks event by event: text deltas (spliced into a
prebuilt chunk without decoding the event, the common case), function call deltas with a stable
``index`` (``id`` and ``name`` in the first), reasoning summary deltas, then the finish chunk and, when
asked for, the usage chunk. The role chunk waits for the first content, so a failure right after
``response.created`` still falls through to the next step; ``response.failed``, an ``error`` event or an
end before ``response.completed`` is a failed step with the status its code stands for, never a clean end.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any

from ..config import ProviderConfig, Step
from ..errors import StepFailed
from ..http.errors import UpstreamError
from ..http.pool import Headers, UpstreamClient
from ..http.sse import EventSplitter, encode, event_data, event_name
from .base import Completion, QuotedFailure, StreamState, decode_event, read_error
from .openai import OpenAIProvider

MIN_OUTPUT_TOKENS = 16  # the Responses API refuses less ("integer_below_min_value")

# What a failure's error.code stands for, as an HTTP status (routing's fallback, cooling and the
# client's final status go by it).
CODE_STATUS = {
    "rate_limit_exceeded": 429,
    "insufficient_quota": 429,
    "server_error": 500,
    "vector_store_timeout": 504,
    "context_length_exceeded": 400,
    "invalid_prompt": 400,
    "invalid_request": 400,
    "bio_policy": 400,
    "misalignment_policy_violation": 400,
    "data_residency_mismatch": 400,
    "usage_not_included": 403,
}
_STATUS_TYPE = {429: "rate_limit_error", 403: "permission_error"}

_DATA_KEYS_PASSED = ("temperature", "top_p", "parallel_tool_calls", "user", "safety_identifier",
                     "prompt_cache_key", "prompt_cache_retention", "metadata", "service_tier")
# Headers of ours a client's may not replace (native steps pass the client's others on).
_OWN_HEADERS = {b"authorization", b"content-type", b"accept", b"content-length", b"host", b"transfer-encoding",
                b"connection", b"x-api-key", b"api-key"}

_DELTA_RE = re.compile(rb'"delta"\s*:\s*("(?:[^"\\]|\\.)*")')
_INDEX_RE = re.compile(rb'"output_index"\s*:\s*(\d+)')
_TEXT_DELTA = b"response.output_text.delta"
_TRY_AGAIN_RE = re.compile(r"try again in (\d+(?:\.\d+)?)\s*(ms|s)\b", re.I)


class Unsupported(StepFailed):
    """The chat request cannot be said in the Responses API: a 400 failed step."""

    def __init__(self, message: str) -> None:
        super().__init__(f"responses: {message}", status=400,
                         error={"message": f"responses: {message}", "type": "invalid_request_error",
                                "code": "unsupported_parameter"})


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def status_for(code: Any) -> int:
    """The HTTP status a Responses failure code stands for (unknown codes: 500, a server-side failure)."""
    if isinstance(code, str):
        if code in CODE_STATUS:
            return CODE_STATUS[code]
        if code.startswith("invalid_") or "image" in code:
            return 400
    return 500


def failure(err: Any, prefix: str) -> StepFailed:
    """A failed step from a ``response.error`` or an ``error`` event, with its code's status."""
    err = _obj(err)
    code = err.get("code") if isinstance(err.get("code"), str) else None
    message = str(err.get("message") or code or "no message")
    status = status_for(code)
    etype = _STATUS_TYPE.get(status, "invalid_request_error" if status < 500 else "server_error")
    if code == "insufficient_quota":
        etype = "insufficient_quota"
    label = f"{prefix}{code}: " if code else prefix
    failed = StepFailed(f"{label}{message}", status=status, error={"message": message, "type": etype, "code": code})
    if status == 429:
        # A stream has no Retry-After header: the wait is in the words ("Please try again in 1.5s").
        m = _TRY_AGAIN_RE.search(message)
        if m:
            failed.retry_after = float(m.group(1)) / (1000 if m.group(2) == "ms" else 1)
    return failed


def _error_of(ev: dict[str, Any]) -> Any:
    """An ``error`` event's error: its own fields (the documented shape), or a nested ``error`` object."""
    return ev["error"] if isinstance(ev.get("error"), dict) else ev


def chat_usage(u: Any) -> dict[str, Any] | None:
    """A Responses ``usage`` in chat-completions form (what accounting, limits and logs read)."""
    if not isinstance(u, dict):
        return None

    def num(v: Any) -> int:
        return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0

    prompt, completion = num(u.get("input_tokens")), num(u.get("output_tokens"))
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": num(u.get("total_tokens")) or prompt + completion,
            "prompt_tokens_details": {"cached_tokens": num(_obj(u.get("input_tokens_details")).get("cached_tokens"))},
            "completion_tokens_details": {
                "reasoning_tokens": num(_obj(u.get("output_tokens_details")).get("reasoning_tokens"))}}


# ---------------------------------------------------------------------------
# Request: chat -> Responses
# ---------------------------------------------------------------------------

def _text(content: Any, where: str) -> str:
    """The text of a message whose content may only be text (string or text parts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for j, part in enumerate(content):
            p = _obj(part)
            if p.get("type") == "text":
                out.append(str(p.get("text") or ""))
            elif p.get("type") != "refusal":
                raise Unsupported(f"{where}.content[{j}]: part type {p.get('type')!r} is not allowed here")
        return "".join(out)
    raise Unsupported(f"{where}.content: must be a string or a list of parts")


def _user_content(content: Any, where: str) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise Unsupported(f"{where}.content: must be a string or a list of parts")
    out: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        p = _obj(part)
        kind = p.get("type")
        if kind == "text":
            out.append({"type": "input_text", "text": str(p.get("text") or "")})
        elif kind == "image_url":
            img = _obj(p.get("image_url"))
            url = img.get("url") if img else p.get("image_url")
            if not isinstance(url, str):
                raise Unsupported(f"{where}.content[{j}].image_url.url: required")
            out.append({"type": "input_image", "image_url": url, "detail": str(img.get("detail") or "auto")})
        elif kind == "file":
            f = _obj(p.get("file"))
            part_out: dict[str, Any] = {"type": "input_file"}
            for key in ("file_data", "file_id", "filename"):
                if isinstance(f.get(key), str):
                    part_out[key] = f[key]
            if len(part_out) == 1:
                raise Unsupported(f"{where}.content[{j}].file: needs file_data or file_id")
            out.append(part_out)
        else:
            raise Unsupported(f"{where}.content[{j}]: part type {kind!r} (audio and others) is not supported")
    return out


def _tools(body: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for i, t in enumerate(body.get("tools") or []):
        t = _obj(t)
        if t.get("type") != "function":
            raise Unsupported(f"tools[{i}]: only function tools are translated (got {t.get('type')!r})")
        f = _obj(t.get("function"))
        params = f.get("parameters")
        tool: dict[str, Any] = {"type": "function", "name": str(f.get("name") or ""),
                                "parameters": params if isinstance(params, dict)
                                else {"type": "object", "properties": {}},
                                "strict": f.get("strict") is True}
        if isinstance(f.get("description"), str):
            tool["description"] = f["description"]
        out.append(tool)
    return out


def _tool_choice(tc: Any) -> Any:
    if isinstance(tc, str):
        return tc
    tc = _obj(tc)
    if tc.get("type") == "function":
        return {"type": "function", "name": str(_obj(tc.get("function")).get("name") or tc.get("name") or "")}
    if tc.get("type") == "allowed_tools":
        allowed = _obj(tc.get("allowed_tools"))
        return {"type": "allowed_tools", "mode": allowed.get("mode", "auto"),
                "tools": [{"type": "function", "name": str(_obj(x.get("function")).get("name") or x.get("name"))}
                          for x in allowed.get("tools") or [] if isinstance(x, dict)]}
    raise Unsupported(f"tool_choice of type {tc.get('type')!r} is not translated")


def _text_format(rf: Any) -> dict[str, Any] | None:
    rf = _obj(rf)
    kind = rf.get("type")
    if kind == "json_schema":
        js = _obj(rf.get("json_schema"))
        fmt: dict[str, Any] = {"type": "json_schema", "name": str(js.get("name") or "response"),
                               "schema": _obj(js.get("schema"))}
        for key in ("strict", "description"):
            if js.get(key) is not None:
                fmt[key] = js[key]
        return fmt
    if kind in ("json_object", "text"):
        return {"type": kind}
    if rf:
        raise Unsupported(f"response_format of type {kind!r} is not translated")
    return None


def to_responses(body: dict[str, Any], model: str, stream: bool = False) -> dict[str, Any]:
    """A chat-completions body as a Responses create request (see the module docstring)."""
    if body.get("n") not in (None, 1):
        raise Unsupported("n > 1 (the Responses API gives one answer)")
    if body.get("audio") is not None or "audio" in (body.get("modalities") or []):
        raise Unsupported("audio output")
    if body.get("functions") is not None or body.get("function_call") is not None:
        raise Unsupported("legacy functions/function_call (use tools)")
    items: list[dict[str, Any]] = []
    for i, m in enumerate(body.get("messages") or []):
        m = _obj(m)
        where = f"messages[{i}]"
        role = m.get("role")
        if role in ("system", "developer"):
            items.append({"role": role, "content": _text(m.get("content"), where)})
        elif role == "user":
            items.append({"role": "user", "content": _user_content(m.get("content"), where)})
        elif role == "assistant":
            text = _text(m.get("content"), where)
            if text:
                items.append({"role": "assistant", "content": text})
            for j, tc in enumerate(m.get("tool_calls") or []):
                tc = _obj(tc)
                if tc.get("type", "function") != "function":
                    raise Unsupported(f"{where}.tool_calls[{j}]: only function calls are translated")
                f = _obj(tc.get("function"))
                items.append({"type": "function_call", "call_id": str(tc.get("id") or ""),
                              "name": str(f.get("name") or ""), "arguments": str(f.get("arguments") or "{}")})
        elif role == "tool":
            items.append({"type": "function_call_output", "call_id": str(m.get("tool_call_id") or ""),
                          "output": _text(m.get("content"), where)})
        else:
            raise Unsupported(f"{where}.role {role!r} is not translated")
    out: dict[str, Any] = {"model": model, "input": items, "store": False}
    tools = _tools(body)
    if tools:
        out["tools"] = tools
    if body.get("tool_choice") is not None and (tools or body["tool_choice"] in ("none", "auto")):
        out["tool_choice"] = _tool_choice(body["tool_choice"])
    fmt = _text_format(body.get("response_format"))
    text_cfg: dict[str, Any] = {"format": fmt} if fmt else {}
    if isinstance(body.get("verbosity"), str):
        text_cfg["verbosity"] = body["verbosity"]
    if text_cfg:
        out["text"] = text_cfg
    mt = body.get("max_completion_tokens")
    if mt is None:
        mt = body.get("max_tokens")
    if isinstance(mt, int) and not isinstance(mt, bool):
        out["max_output_tokens"] = max(mt, MIN_OUTPUT_TOKENS)
    if isinstance(body.get("reasoning_effort"), str):
        out["reasoning"] = {"effort": body["reasoning_effort"]}
    for key in _DATA_KEYS_PASSED:
        if body.get(key) is not None:
            out[key] = body[key]
    if stream:
        out["stream"] = True
    return out


# ---------------------------------------------------------------------------
# Answers: Responses -> chat
# ---------------------------------------------------------------------------

def finish_of(resp: dict[str, Any], tool_calls: bool) -> str:
    if resp.get("status") == "incomplete":
        reason = _obj(resp.get("incomplete_details")).get("reason")
        return "content_filter" if reason == "content_filter" else "length"
    return "tool_calls" if tool_calls else "stop"


def check_response(raw: bytes, who: str = "upstream") -> dict[str, Any]:
    """A 2xx body that must be a finished ``response`` object (a failed one is a failed step)."""
    try:
        obj = json.loads(raw)
    except ValueError:
        raise QuotedFailure(f"{who} answered 2xx with a body that is not JSON", raw) from None
    if not isinstance(obj, dict):
        raise StepFailed(f"{who} answered 2xx with JSON that is not an object")
    if obj.get("status") == "failed" or (obj.get("error") and obj.get("object") != "response"):
        raise failure(obj.get("error"), f"{who} answered 2xx with a failed response: ")
    if obj.get("object") != "response" or not isinstance(obj.get("output"), list):
        raise StepFailed(f"{who} answered 2xx with a body that is not a Responses API response")
    if obj.get("status") in ("queued", "in_progress"):
        raise StepFailed(f"{who} answered with a response still {obj['status']} (background responses are "
                         "not supported)")
    return obj


def from_responses(resp: dict[str, Any]) -> dict[str, Any]:
    """A finished ``response`` object as a chat completion."""
    text: list[str] = []
    refusal: list[str] = []
    thoughts: list[str] = []
    calls: list[dict[str, Any]] = []
    for it in resp.get("output") or []:
        it = _obj(it)
        kind = it.get("type")
        if kind == "message":
            for c in it.get("content") or []:
                c = _obj(c)
                if c.get("type") == "output_text":
                    text.append(str(c.get("text") or ""))
                elif c.get("type") == "refusal":
                    refusal.append(str(c.get("refusal") or ""))
        elif kind == "function_call":
            calls.append({"id": str(it.get("call_id") or it.get("id") or ""), "type": "function",
                          "function": {"name": str(it.get("name") or ""),
                                       "arguments": str(it.get("arguments") or "{}")}})
        elif kind == "reasoning":
            thoughts += [str(_obj(s).get("text") or "") for s in it.get("summary") or []]
            thoughts += [str(_obj(s).get("text") or "") for s in it.get("content") or []]
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text) if text or not calls else None}
    if refusal:
        message["refusal"] = "".join(refusal)
        if not text:
            message["content"] = None
    if thoughts:
        message["reasoning_content"] = "\n\n".join(t for t in thoughts if t)
    if calls:
        message["tool_calls"] = calls
    created = resp.get("created_at")
    out: dict[str, Any] = {
        "id": str(resp.get("id") or "resp"), "object": "chat.completion",
        "created": int(created) if isinstance(created, (int, float)) else 0, "model": str(resp.get("model") or ""),
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_of(resp, bool(calls))}],
    }
    usage = chat_usage(resp.get("usage"))
    if usage is not None:
        out["usage"] = usage
    if isinstance(resp.get("service_tier"), str):
        out["service_tier"] = resp["service_tier"]
    return out


class StreamTranslator:
    """Responses stream events -> chat chunk SSE bytes, one event at a time (pure: no I/O)."""

    __slots__ = ("include_usage", "model", "started", "finished", "usage", "finish_reason", "_tools", "_text",
                 "_id", "_created", "_prefix")

    def __init__(self, include_usage: bool, model: str) -> None:
        self.include_usage = include_usage
        self.model = model
        self.started = False  # the role chunk went out
        self.finished = False  # response.completed / response.incomplete seen
        self.usage: dict[str, Any] | None = None
        self.finish_reason: str | None = None
        self._tools: dict[int, list[Any]] = {}  # output_index -> [tool index, arguments sent]
        self._text: set[int] = set()  # output_index of messages whose text came as deltas
        self._id = "resp"
        self._created = 0
        self._prefix = b""

    def _head(self, resp: dict[str, Any]) -> None:
        self._id = str(resp.get("id") or self._id)
        self.model = str(resp.get("model") or self.model)
        created = resp.get("created_at")
        self._created = int(created) if isinstance(created, (int, float)) else 0
        # Every text chunk is this prefix, the delta's JSON string as the upstream wrote it, and a suffix.
        self._prefix = (b'data: {"id":' + json.dumps(self._id).encode() + b',"object":"chat.completion.chunk",'
                        b'"created":' + str(self._created).encode() + b',"model":'
                        + json.dumps(self.model, ensure_ascii=False).encode()
                        + b',"choices":[{"index":0,"delta":{"content":')

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"id": self._id, "object": "chat.completion.chunk", "created": self._created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    def _emit(self, out: list[bytes], delta: dict[str, Any]) -> None:
        if not self.started:
            self.started = True
            out.append(encode(self._chunk({"role": "assistant", "content": ""})))
        out.append(encode(self._chunk(delta)))

    def feed(self, ev: bytes, out: list[bytes]) -> None:
        """One SSE event; its chat chunks appended to ``out``."""
        name = event_name(ev) if ev.startswith(b"event:") else None
        d = event_data(ev)
        if d is None or d == b"[DONE]":
            return  # a comment; [DONE] is no Responses event (an end without response.completed fails later)
        if name == _TEXT_DELTA and self.started and self._prefix:
            m = _DELTA_RE.search(d)
            i = _INDEX_RE.search(d)
            if m is not None and i is not None:  # the common chunk: no decoding
                self._text.add(int(i.group(1)))
                out.append(self._prefix + m.group(1) + b'},"logprobs":null,"finish_reason":null}]}\n\n')
                return
        obj = decode_event(d, "responses upstream")
        kind = str(obj.get("type") or (name.decode("latin-1") if name else ""))
        self._event(kind, obj, out)

    def _event(self, kind: str, ev: dict[str, Any], out: list[bytes]) -> None:
        idx = ev.get("output_index")
        if kind in ("response.created", "response.in_progress", "response.queued"):
            if kind == "response.created" or not self._prefix:
                self._head(_obj(ev.get("response")))
        elif kind == "response.output_text.delta":
            if isinstance(idx, int):
                self._text.add(idx)
            if ev.get("delta"):
                self._emit(out, {"content": str(ev["delta"])})
        elif kind == "response.refusal.delta":
            if isinstance(idx, int):
                self._text.add(idx)
            if ev.get("delta"):
                self._emit(out, {"refusal": str(ev["delta"])})
        elif kind in ("response.reasoning_summary_text.delta", "response.reasoning_text.delta"):
            if ev.get("delta"):
                self._emit(out, {"reasoning_content": str(ev["delta"])})
        elif kind == "response.output_item.added":
            item = _obj(ev.get("item"))
            if item.get("type") == "function_call" and isinstance(idx, int):
                tool = self._tools[idx] = [len(self._tools), False]
                self._emit(out, {"tool_calls": [{"index": tool[0], "id": str(item.get("call_id") or item.get("id")),
                                                 "type": "function",
                                                 "function": {"name": str(item.get("name") or ""), "arguments": ""}}]})
        elif kind == "response.function_call_arguments.delta":
            call = self._tools.get(idx) if isinstance(idx, int) else None
            if call is None:
                raise StepFailed("responses stream: arguments for a function call that was never added")
            if ev.get("delta"):
                call[1] = True
                self._emit(out, {"tool_calls": [{"index": call[0], "function": {"arguments": str(ev["delta"])}}]})
        elif kind in ("response.function_call_arguments.done", "response.output_item.done"):
            self._item_done(kind, ev, idx, out)
        elif kind in ("response.completed", "response.incomplete"):
            self._end(_obj(ev.get("response")), out)
        elif kind == "response.failed":
            raise failure(_obj(ev.get("response")).get("error"), "responses stream failed: ")
        elif kind == "error":
            raise failure(_error_of(ev), "responses stream error: ")
        # content_part.*, output_text.done, annotations, built-in tool progress: nothing for a chat client.

    def _item_done(self, kind: str, ev: dict[str, Any], idx: Any, out: list[bytes]) -> None:
        """A call whose arguments, or a message whose text, came without deltas gets them whole here."""
        item = _obj(ev.get("item"))
        tool = self._tools.get(idx) if isinstance(idx, int) else None
        if tool is not None and not tool[1]:
            args = ev.get("arguments") if kind == "response.function_call_arguments.done" else item.get("arguments")
            tool[1] = True
            self._emit(out, {"tool_calls": [{"index": tool[0], "function": {"arguments": str(args or "{}")}}]})
        elif kind == "response.output_item.done" and item.get("type") == "message" and idx not in self._text:
            for c in item.get("content") or []:
                c = _obj(c)
                if c.get("type") == "output_text" and c.get("text"):
                    self._emit(out, {"content": str(c["text"])})
                elif c.get("type") == "refusal" and c.get("refusal"):
                    self._emit(out, {"refusal": str(c["refusal"])})

    def _end(self, resp: dict[str, Any], out: list[bytes]) -> None:
        self.finished = True
        self.usage = chat_usage(resp.get("usage"))
        self.finish_reason = finish_of(resp, bool(self._tools))
        if not self.started:
            self.started = True
            out.append(encode(self._chunk({"role": "assistant", "content": ""})))
        out.append(encode(self._chunk({}, self.finish_reason)))
        if self.include_usage:
            out.append(encode({"id": self._id, "object": "chat.completion.chunk", "created": self._created,
                               "model": self.model, "choices": [],
                               "usage": self.usage or {"prompt_tokens": 0, "completion_tokens": 0,
                                                       "total_tokens": 0}}))


# ---------------------------------------------------------------------------
# The provider
# ---------------------------------------------------------------------------

def _dumps(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def _kind(ev: bytes, d: bytes) -> bytes:
    """An event's type: its ``event:`` line (OpenAI names every event), else the data's ``type``."""
    name = event_name(ev) if b"event:" in ev else None
    if name:
        return name
    return str(decode_event(d, "responses upstream").get("type") or "").encode()


class OpenAIResponsesProvider(OpenAIProvider):
    """An OpenAI(-compatible) upstream reached through ``POST {base_url}/responses``."""

    def __init__(self, cfg: ProviderConfig, client: UpstreamClient) -> None:
        super().__init__(cfg, client)
        self.responses_url = self.base + "/responses"

    def native(self, op: str, step: Step) -> bool:
        return op == "responses"

    def _with(self, ours: Headers, client: Headers) -> Headers:
        """Our headers, and the client's others (``openai-beta``, ...) after them."""
        if not client:
            return ours
        names = {k for k, _ in ours} | _OWN_HEADERS
        return [*ours, *((k, v) for k, v in client if k.lower() not in names)]

    # -- chat completions, translated ------------------------------------
    async def complete(self, body: dict[str, Any], step: Step) -> Completion:
        data = _dumps(to_responses(body, step.model))
        async with self.client.stream(b"POST", self.responses_url, self.headers, data, self.cfg.proxy) as resp:
            if not 200 <= resp.status < 300:
                raise await read_error(resp, self.name)
            raw = await resp.read()
        chat = from_responses(check_response(raw))
        return Completion(_dumps(chat), chat.get("usage"))

    async def stream(self, body: dict[str, Any], step: Step, state: StreamState) -> AsyncIterator[bytes]:
        data = _dumps(to_responses(body, step.model, stream=True))
        tr = StreamTranslator(state.include_usage, step.model)
        async with self.client.stream(b"POST", self.responses_url, self.stream_headers, data, self.cfg.proxy) as resp:
            if not 200 <= resp.status < 300:
                raise await read_error(resp, self.name)
            await _check_streaming(resp)
            splitter = EventSplitter()
            try:
                async for chunk in resp.aiter_raw():
                    if tr.finished:
                        continue  # read to the end so the connection can be reused
                    out: list[bytes] = []
                    try:
                        for ev in splitter.feed(chunk):
                            tr.feed(ev, out)
                            if tr.finished:
                                break
                    except StepFailed:
                        if out:  # chunks that arrived together with the failure reach the client first
                            yield b"".join(out)
                        raise
                    if tr.finished:
                        state.usage, state.finish_reason = tr.usage, tr.finish_reason
                    if out:
                        yield out[0] if len(out) == 1 else b"".join(out)
            except UpstreamError:
                if not tr.finished:
                    raise
        if not tr.finished:
            raise StepFailed("responses stream ended before its first chunk" if not tr.started
                             else "responses stream ended before response.completed")

    # -- the Responses door, native ----------------------------------------
    async def send_native(self, op: str, body: dict[str, Any], step: Step, headers: Headers) -> Completion:
        if op != "responses":
            return await super().send_native(op, body, step, headers)
        async with self.client.stream(b"POST", self.responses_url, self._with(self.headers, headers), _dumps(body),
                                      self.cfg.proxy) as resp:
            if not 200 <= resp.status < 300:
                raise await read_error(resp, self.name)
            raw = await resp.read()
        return Completion(raw, chat_usage(check_response(raw).get("usage")))

    async def stream_native(self, op: str, body: dict[str, Any], step: Step, state: StreamState,
                            headers: Headers) -> AsyncIterator[bytes]:
        if op != "responses":
            raise StepFailed(f"provider type {self.type_name!r} does not speak {op}", status=400)
        sent = self._with(self.stream_headers, headers)
        async with self.client.stream(b"POST", self.responses_url, sent, _dumps(body), self.cfg.proxy) as resp:
            if not 200 <= resp.status < 300:
                raise await read_error(resp, self.name)
            await _check_streaming(resp)
            splitter = EventSplitter()
            first, done = True, False
            try:
                async for chunk in resp.aiter_raw():
                    if done:
                        continue
                    out: list[bytes] = []
                    try:
                        for ev in splitter.feed(chunk):
                            d = event_data(ev)
                            if d is None:
                                continue  # comments: ours are the gateway's keep-alives
                            if d == b"[DONE]":
                                break  # not the API's end: caught below as an end before response.completed
                            kind = _kind(ev, d)
                            if first:
                                first = False
                                if not kind.startswith(b"response.") and kind != b"error":
                                    raise StepFailed("upstream sent a stream event that is not a Responses event")
                            if kind in (b"response.completed", b"response.incomplete"):
                                resp_obj = _obj(decode_event(d, "responses upstream").get("response"))
                                state.usage = chat_usage(resp_obj.get("usage"))
                                state.finish_reason = finish_of(resp_obj, any(
                                    _obj(it).get("type") == "function_call" for it in resp_obj.get("output") or []))
                                done = True
                            elif kind == b"response.failed":
                                raise failure(_obj(decode_event(d).get("response")).get("error"),
                                              "responses stream failed: ")
                            elif kind == b"error":
                                raise failure(_error_of(decode_event(d)), "responses stream error: ")
                            out.append(ev)
                            if done:
                                break
                    except StepFailed:
                        if out:
                            yield b"".join(out)
                        raise
                    if out:
                        yield out[0] if len(out) == 1 else b"".join(out)
            except UpstreamError:
                if not done:
                    raise
        if not done:
            raise StepFailed("responses stream ended before its first event" if first
                             else "responses stream ended before response.completed")


async def _check_streaming(resp: Any) -> None:
    """A 2xx that is not an event stream is a failed step (its error or garbage quoted)."""
    ctype = resp.header(b"content-type") or b""
    if b"text/event-stream" not in ctype:
        raw = await resp.read()
        check_response(raw)  # raises for errors and garbage
        raise StepFailed(f"upstream did not stream (content-type {ctype.decode('latin-1')!r})")
