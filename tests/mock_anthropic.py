"""A mock of Anthropic's Messages API (anthropic-version 2023-06-01) on top of MockUpstream.

It speaks the real wire format: JSON ``message`` objects, SSE streams with ``event:`` lines
in the documented order (``message_start``, ``ping``, ``content_block_start`` /
``content_block_delta`` / ``content_block_stop`` per block, ``message_delta``,
``message_stop``, no ``[DONE]``), and errors as ``{"type": "error", "error": {...}}``.

Every request is checked against the documented request schema; a request that breaks it
gets the 400 ``invalid_request_error`` the real API would send, and the problems are kept
in :attr:`AnthropicMock.problems` so tests can assert there were none. Everything the
mock sends is validated with the official ``anthropic`` SDK's own types, so the mock
cannot drift from the real format unnoticed.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anthropic.types
from pydantic import TypeAdapter

from tests.mock_upstream import MockUpstream, Received, Reply

API_VERSION = "2023-06-01"
API_KEY = "sk-ant-test-secret-key"

TOP_LEVEL_KEYS = {
    "model", "messages", "max_tokens", "system", "stop_sequences", "temperature", "top_p", "top_k",
    "stream", "tools", "tool_choice", "metadata", "thinking", "service_tier",
}
IMAGE_MEDIA = {"image/jpeg", "image/png", "image/gif", "image/webp"}
ID_RE = re.compile(r"^[a-zA-Z0-9_-]+$")
TOOL_NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")

_EVENT = TypeAdapter(anthropic.types.RawMessageStreamEvent)


# ---------------------------------------------------------------------------
# Request schema
# ---------------------------------------------------------------------------

def check_request(rec: Received, api_key: str = API_KEY, versions: tuple[str, ...] = (API_VERSION,)) -> list[str]:
    """Every way the request breaks the documented Messages API schema (empty when none). ``versions``: the
    ``anthropic-version`` values accepted (a client's own passes through the Messages door unchanged)."""
    p: list[str] = []
    if rec.method != "POST" or rec.path != "/v1/messages":
        p.append(f"request line: expected POST /v1/messages, got {rec.method} {rec.path}")
    h = rec.headers
    if h.get("x-api-key") != api_key:
        p.append("header x-api-key: missing or wrong")
    if h.get("anthropic-version") not in versions:
        p.append(f"header anthropic-version: expected {' or '.join(versions)}, got {h.get('anthropic-version')!r}")
    if "application/json" not in h.get("content-type", ""):
        p.append("header content-type: must be application/json")
    if "authorization" in h:
        p.append("header authorization: Anthropic takes x-api-key, not a bearer token")
    try:
        body = json.loads(rec.body)
    except ValueError:
        return [*p, "body: not JSON"]
    if not isinstance(body, dict):
        return [*p, "body: not an object"]
    for k in sorted(set(body) - TOP_LEVEL_KEYS):
        p.append(f"{k}: unknown field")
    if not isinstance(body.get("model"), str) or not body["model"]:
        p.append("model: required string")
    mt = body.get("max_tokens")
    if not isinstance(mt, int) or isinstance(mt, bool) or mt < 1:
        p.append("max_tokens: required integer >= 1")
    _check_system(body.get("system"), p)
    tool_names = _check_tools(body, p)
    _check_messages(body.get("messages"), p)
    stops = body.get("stop_sequences")
    if stops is not None and (not isinstance(stops, list) or not all(isinstance(s, str) for s in stops)):
        p.append("stop_sequences: must be a list of strings")
    for k, lo, hi in (("temperature", 0, 1), ("top_p", 0, 1)):
        v = body.get(k)
        if v is not None and (not isinstance(v, (int, float)) or not lo <= v <= hi):
            p.append(f"{k}: must be a number in [{lo}, {hi}]")
    if "top_k" in body and (not isinstance(body["top_k"], int) or body["top_k"] < 0):
        p.append("top_k: must be an integer >= 0")
    if "stream" in body and not isinstance(body["stream"], bool):
        p.append("stream: must be a boolean")
    md = body.get("metadata")
    if md is not None and (not isinstance(md, dict) or set(md) - {"user_id"}):
        p.append("metadata: only user_id is allowed")
    th = body.get("thinking")
    if th is not None:
        if not isinstance(th, dict) or th.get("type") not in ("enabled", "disabled"):
            p.append("thinking.type: must be enabled or disabled")
        elif th["type"] == "enabled":
            b = th.get("budget_tokens")
            if not isinstance(b, int) or b < 1024 or (isinstance(mt, int) and b >= mt):
                p.append("thinking.budget_tokens: must be >= 1024 and less than max_tokens")
    tc = body.get("tool_choice")
    if tc is not None:
        if not isinstance(tc, dict) or tc.get("type") not in ("auto", "any", "tool", "none"):
            p.append("tool_choice.type: must be auto, any, tool or none")
        else:
            if set(tc) - {"type", "name", "disable_parallel_tool_use"}:
                p.append("tool_choice: unknown field")
            if tc["type"] == "tool" and tc.get("name") not in tool_names:
                p.append("tool_choice.name: must name one of the tools")
            if tc["type"] != "tool" and "name" in tc:
                p.append("tool_choice.name: only for type tool")
            if "disable_parallel_tool_use" in tc and not isinstance(tc["disable_parallel_tool_use"], bool):
                p.append("tool_choice.disable_parallel_tool_use: must be a boolean")
            if not tool_names and tc["type"] != "none":
                p.append("tool_choice: requires tools")
            if (tc["type"] in ("any", "tool") and isinstance(th, dict) and th.get("type") == "enabled"):
                p.append("tool_choice: forced tool use is not compatible with thinking")
    return p


def _check_system(system: Any, p: list[str]) -> None:
    if system is None or isinstance(system, str):
        return
    if not isinstance(system, list):
        p.append("system: must be a string or a list of text blocks")
        return
    for i, b in enumerate(system):
        if not isinstance(b, dict) or b.get("type") != "text" or not isinstance(b.get("text"), str) or not b["text"]:
            p.append(f"system.{i}: must be a non-empty text block")


def _check_tools(body: dict[str, Any], p: list[str]) -> set[str]:
    tools = body.get("tools")
    names: set[str] = set()
    if tools is None:
        return names
    if not isinstance(tools, list):
        p.append("tools: must be a list")
        return names
    for i, t in enumerate(tools):
        if not isinstance(t, dict):
            p.append(f"tools.{i}: must be an object")
            continue
        for k in sorted(set(t) - {"name", "description", "input_schema", "cache_control"}):
            p.append(f"tools.{i}.{k}: unknown field")
        name = t.get("name")
        if not isinstance(name, str) or not TOOL_NAME_RE.match(name):
            p.append(f"tools.{i}.name: must match {TOOL_NAME_RE.pattern}")
        elif name in names:
            p.append(f"tools.{i}.name: duplicate tool name")
        else:
            names.add(name)
        if "description" in t and not isinstance(t["description"], str):
            p.append(f"tools.{i}.description: must be a string")
        schema = t.get("input_schema")
        if not isinstance(schema, dict) or schema.get("type") != "object":
            p.append(f"tools.{i}.input_schema: must be a JSON schema with type object")
    return names


def _check_messages(messages: Any, p: list[str]) -> None:
    if not isinstance(messages, list) or not messages:
        p.append("messages: required non-empty list")
        return
    prev_role = None
    pending_tool_ids: list[str] = []
    for i, m in enumerate(messages):
        w = f"messages.{i}"
        if not isinstance(m, dict):
            p.append(f"{w}: must be an object")
            continue
        for k in sorted(set(m) - {"role", "content"}):
            p.append(f"{w}.{k}: unknown field")
        role = m.get("role")
        if role not in ("user", "assistant"):
            p.append(f"{w}.role: must be user or assistant")
            continue
        if i == 0 and role != "user":
            p.append(f"{w}.role: the first message must be a user message")
        if role == prev_role:
            p.append(f"{w}.role: roles must alternate (consecutive {role} turns)")
        prev_role = role
        content = m.get("content")
        blocks: list[Any]
        if isinstance(content, str):
            if not content:
                p.append(f"{w}.content: must not be empty")
            blocks = []
        elif isinstance(content, list) and content:
            blocks = content
        else:
            p.append(f"{w}.content: must be a non-empty string or list of blocks")
            continue
        result_ids: list[str] = []
        seen_other = False
        for j, b in enumerate(blocks):
            bw = f"{w}.content.{j}"
            kind = b.get("type") if isinstance(b, dict) else None
            if kind == "tool_result":
                if role != "user":
                    p.append(f"{bw}: tool_result only in user messages")
                if seen_other:
                    p.append(f"{bw}: tool_result blocks must come first in the user message")
                result_ids.append(str(b.get("tool_use_id")))
                _check_tool_result(b, bw, p)
            else:
                seen_other = True
                _check_block(b, role, bw, p)
        if role == "user":
            if pending_tool_ids and sorted(result_ids) != sorted(pending_tool_ids):
                p.append(f"{w}: tool_use ids {pending_tool_ids} need tool_result blocks right after "
                         f"(got {result_ids})")
            elif result_ids and not pending_tool_ids:
                p.append(f"{w}: tool_result without a tool_use in the previous message")
            pending_tool_ids = []
        else:
            pending_tool_ids = [str(b.get("id")) for b in blocks if isinstance(b, dict) and b.get("type") == "tool_use"]


def _check_block(b: Any, role: str, w: str, p: list[str]) -> None:
    if not isinstance(b, dict):
        p.append(f"{w}: must be an object")
        return
    kind = b.get("type")
    allowed: dict[str, set[str]] = {
        "text": {"type", "text", "cache_control", "citations"},
        "image": {"type", "source", "cache_control"},
        "document": {"type", "source", "cache_control", "title", "context", "citations"},
        "tool_use": {"type", "id", "name", "input", "cache_control"},
        "thinking": {"type", "thinking", "signature"},
        "redacted_thinking": {"type", "data"},
    }
    if kind not in allowed:
        p.append(f"{w}.type: unknown block type {kind!r}")
        return
    for k in sorted(set(b) - allowed[kind]):
        p.append(f"{w}.{k}: unknown field")
    if kind == "text":
        if not isinstance(b.get("text"), str) or not b["text"]:
            p.append(f"{w}.text: text content blocks must be non-empty")
    elif kind == "image":
        if role != "user":
            p.append(f"{w}: images only in user messages")
        _check_source(b.get("source"), IMAGE_MEDIA, w, p)
    elif kind == "document":
        _check_source(b.get("source"), {"application/pdf"}, w, p)
    elif kind == "tool_use":
        if role != "assistant":
            p.append(f"{w}: tool_use only in assistant messages")
        if not isinstance(b.get("id"), str) or not ID_RE.match(b["id"]):
            p.append(f"{w}.id: must match {ID_RE.pattern}")
        if not isinstance(b.get("name"), str) or not b["name"]:
            p.append(f"{w}.name: required")
        if not isinstance(b.get("input"), dict):
            p.append(f"{w}.input: must be an object")
    elif kind in ("thinking", "redacted_thinking") and role != "assistant":
        p.append(f"{w}: thinking only in assistant messages")


def _check_source(src: Any, media: set[str], w: str, p: list[str]) -> None:
    if not isinstance(src, dict):
        p.append(f"{w}.source: required")
        return
    if src.get("type") == "base64":
        if set(src) != {"type", "media_type", "data"}:
            p.append(f"{w}.source: base64 source takes type, media_type, data")
        if src.get("media_type") not in media:
            p.append(f"{w}.source.media_type: must be one of {sorted(media)}")
        try:
            base64.b64decode(str(src.get("data")), validate=True)
        except (binascii.Error, ValueError):
            p.append(f"{w}.source.data: not base64")
    elif src.get("type") == "url":
        if set(src) != {"type", "url"} or not str(src.get("url", "")).startswith(("http://", "https://")):
            p.append(f"{w}.source: url source takes type and an http(s) url")
    else:
        p.append(f"{w}.source.type: must be base64 or url")


def _check_tool_result(b: dict[str, Any], w: str, p: list[str]) -> None:
    for k in sorted(set(b) - {"type", "tool_use_id", "content", "is_error", "cache_control"}):
        p.append(f"{w}.{k}: unknown field")
    if not isinstance(b.get("tool_use_id"), str) or not ID_RE.match(b["tool_use_id"]):
        p.append(f"{w}.tool_use_id: must match {ID_RE.pattern}")
    content = b.get("content")
    if content is None or isinstance(content, str):
        return
    if not isinstance(content, list):
        p.append(f"{w}.content: must be a string or a list of blocks")
        return
    for j, c in enumerate(content):
        if not isinstance(c, dict) or c.get("type") not in ("text", "image"):
            p.append(f"{w}.content.{j}: only text and image blocks")
        else:
            _check_block(c, "user", f"{w}.content.{j}", p)


# ---------------------------------------------------------------------------
# Answers
# ---------------------------------------------------------------------------

def message(*blocks: dict[str, Any], stop_reason: str = "end_turn", model: str = "claude-mock",
            usage: dict[str, Any] | None = None, msg_id: str = "msg_01MockMessage",
            stop_sequence: str | None = None) -> dict[str, Any]:
    """A Messages API ``message``, validated by the SDK's own type."""
    msg = {
        "id": msg_id, "type": "message", "role": "assistant", "model": model,
        "content": list(blocks), "stop_reason": stop_reason, "stop_sequence": stop_sequence,
        "usage": usage or {"input_tokens": 12, "output_tokens": 6,
                           "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0},
    }
    anthropic.types.Message.model_validate(msg)
    return msg


def text(t: str) -> dict[str, Any]:
    return {"type": "text", "text": t}


def tool_use(tid: str, name: str, inp: dict[str, Any]) -> dict[str, Any]:
    return {"type": "tool_use", "id": tid, "name": name, "input": inp}


def thinking(t: str) -> dict[str, Any]:
    return {"type": "thinking", "thinking": t, "signature": "EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds"}


def sse(name: str, data: dict[str, Any]) -> bytes:
    """One SSE event framed the way Anthropic frames it."""
    if name not in ("ping", "error"):
        _EVENT.validate_python(data)
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def error_body(etype: str, msg: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": etype, "message": msg}, "request_id": "req_011Mock"}


def split(s: str, n: int) -> list[str]:
    return [s[i:i + n] for i in range(0, len(s), n)] or [""]


def stream_events(msg: dict[str, Any], piece: int = 4) -> list[tuple[str, dict[str, Any]]]:
    """The documented event sequence that streams ``msg``, as (event name, payload) pairs."""
    usage = dict(msg["usage"])
    start_usage = {**usage, "output_tokens": 1}
    head = {**msg, "content": [], "stop_reason": None, "stop_sequence": None, "usage": start_usage}
    ev: list[tuple[str, dict[str, Any]]] = [("message_start", {"type": "message_start", "message": head}),
                                            ("ping", {"type": "ping"})]
    for i, b in enumerate(msg["content"]):
        if b["type"] == "text":
            ev.append(("content_block_start", {"type": "content_block_start", "index": i,
                                               "content_block": {"type": "text", "text": ""}}))
            for frag in split(b["text"], piece):
                ev.append(("content_block_delta", {"type": "content_block_delta", "index": i,
                                                   "delta": {"type": "text_delta", "text": frag}}))
        elif b["type"] == "thinking":
            ev.append(("content_block_start", {"type": "content_block_start", "index": i,
                                               "content_block": {"type": "thinking", "thinking": "",
                                                                 "signature": ""}}))
            for frag in split(b["thinking"], piece):
                ev.append(("content_block_delta", {"type": "content_block_delta", "index": i,
                                                   "delta": {"type": "thinking_delta", "thinking": frag}}))
            ev.append(("content_block_delta", {"type": "content_block_delta", "index": i,
                                               "delta": {"type": "signature_delta", "signature": b["signature"]}}))
        elif b["type"] == "tool_use":
            ev.append(("content_block_start", {"type": "content_block_start", "index": i,
                                               "content_block": {"type": "tool_use", "id": b["id"],
                                                                 "name": b["name"], "input": {}}}))
            raw = json.dumps(b["input"]) if b["input"] else ""
            for frag in ["", *split(raw, piece)] if raw else []:
                ev.append(("content_block_delta", {"type": "content_block_delta", "index": i,
                                                   "delta": {"type": "input_json_delta", "partial_json": frag}}))
        ev.append(("content_block_stop", {"type": "content_block_stop", "index": i}))
    ev.append(("message_delta", {"type": "message_delta",
                                 "delta": {"stop_reason": msg["stop_reason"], "stop_sequence": msg["stop_sequence"]},
                                 "usage": {"output_tokens": usage["output_tokens"]}}))
    ev.append(("message_stop", {"type": "message_stop"}))
    return ev


def frame(events: list[tuple[str, dict[str, Any]]]) -> list[bytes]:
    return [sse(name, data) for name, data in events]


# ---------------------------------------------------------------------------
# The mock
# ---------------------------------------------------------------------------

Scenario = Callable[[dict[str, Any]], "dict[str, Any] | Reply"]


@dataclass
class AnthropicMock:
    """Anthropic behaviours by model name, on a MockUpstream; requests checked as they come.

    A scenario takes the request body and returns a ``message`` dict (sent as JSON, or as a
    documented SSE stream when the request asked to stream) or a ready Reply (errors, cut
    streams, hand-made event sequences).
    """

    upstream: MockUpstream
    api_key: str = API_KEY
    problems: list[str] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    versions: tuple[str, ...] = (API_VERSION,)  # anthropic-version values accepted

    def on(self, model: str, scenario: Scenario) -> None:
        self.upstream.replies[model] = lambda rec: self._answer(rec, scenario)

    def _answer(self, rec: Received, scenario: Scenario) -> Reply:
        problems = check_request(rec, self.api_key, self.versions)
        if problems:
            self.problems += problems
            return Reply(status=400, body=error_body("invalid_request_error", "; ".join(problems)),
                         headers={"request-id": "req_011Mock"})
        body = rec.json
        self.requests.append(body)
        result = scenario(body)
        if isinstance(result, Reply):
            return result
        if body.get("stream"):
            return Reply(sse=frame(stream_events(result)), done=False)
        return Reply(body=result, headers={"request-id": "req_011Mock"})


def error_reply(status: int, etype: str, msg: str) -> Reply:
    return Reply(status=status, body=error_body(etype, msg))


def stream_reply(events: list[tuple[str, dict[str, Any]]], reset_after: int | None = None) -> Reply:
    return Reply(sse=frame(events), done=False, reset_after=reset_after)


# ---------------------------------------------------------------------------
# Token counting (POST /v1/messages/count_tokens)
# ---------------------------------------------------------------------------

COUNT_KEYS = {"model", "messages", "system", "tools", "tool_choice", "thinking", "mcp_servers", "output_config"}


def check_count_request(rec: Received, api_key: str = API_KEY,
                        versions: tuple[str, ...] = (API_VERSION,)) -> list[str]:
    """Every way a count_tokens request breaks the documented schema: the Messages rules without ``max_tokens``
    (and without the fields that only shape an answer), at ``/v1/messages/count_tokens`` (``?beta=true`` too)."""
    p: list[str] = []
    path = rec.path.split("?", 1)[0]
    if rec.method != "POST" or path != "/v1/messages/count_tokens":
        p.append(f"request line: expected POST /v1/messages/count_tokens, got {rec.method} {rec.path}")
    try:
        body = json.loads(rec.body)
    except ValueError:
        return [*p, "body: not JSON"]
    if not isinstance(body, dict):
        return [*p, "body: not an object"]
    for k in sorted(set(body) - COUNT_KEYS):
        p.append(f"{k}: unknown field")
    # The shared rules, as if it were a Messages request with room for any thinking budget.
    probe = Received("POST", "/v1/messages", rec.headers, json.dumps({**body, "max_tokens": 1 << 20}).encode())
    return p + check_request(probe, api_key, versions)


def count_tokens_reply(tokens: int) -> Reply:
    """The answer of count_tokens, validated with the SDK's type."""
    anthropic.types.MessageTokensCount.model_validate({"input_tokens": tokens})
    return Reply(body={"input_tokens": tokens}, headers={"request-id": "req_011MockCount"})


def serve_count_tokens(mock: AnthropicMock, model: str, answer: int | Reply,
                       seen: list[Received] | None = None) -> None:
    """Let ``model`` also answer count_tokens (``answer``: the count, or a ready Reply such as an error); its
    Messages scenario (set with ``mock.on`` before) still answers /v1/messages. Checked requests go to ``seen``."""
    previous = mock.upstream.replies.get(model)

    def reply(rec: Received) -> Reply:
        if not rec.path.startswith("/v1/messages/count_tokens"):
            if previous is None:
                return error_reply(404, "not_found_error", f"model: {model}")
            return previous(rec) if callable(previous) else previous
        problems = check_count_request(rec, mock.api_key, mock.versions)
        if problems:
            mock.problems += problems
            return error_reply(400, "invalid_request_error", "; ".join(problems))
        if seen is not None:
            seen.append(rec)
        return answer if isinstance(answer, Reply) else count_tokens_reply(answer)

    mock.upstream.replies[model] = reply
