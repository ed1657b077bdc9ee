"""``type: gemini``: Google's Gemini API, translated to and from OpenAI chat completions.

API version followed: the Gemini API **v1beta** REST reference
(https://ai.google.dev/api/generate-content, ``models.generateContent`` and
``models.streamGenerateContent?alt=sse``; the ``Schema``, ``Tool``,
``ToolConfig``, ``GenerationConfig``, ``Candidate.FinishReason`` and
``UsageMetadata`` objects; the function-calling and thought-signature guides),
as published in 2025-2026. The key goes in ``x-goog-api-key``, never in the URL.

The translation lives in module-level functions so that ``type: vertex``
(Gemini models on Vertex AI, whose ``generateContent`` speaks the same JSON)
reuses it unchanged; only the URL and the authentication differ.

What is translated, and why it is done the way it is:

* ``system``/``developer`` messages become ``systemInstruction``; user and
  assistant messages become ``contents`` with roles ``user``/``model``;
  consecutive messages of one role are merged (Gemini wants turns, and
  parallel function responses belong in one turn).
* ``tools`` become ``functionDeclarations`` whose ``parameters`` are cleaned
  to the OpenAPI subset Gemini accepts (``$ref`` inlined, ``oneOf``→``anyOf``,
  ``allOf`` merged, ``["x","null"]``→``nullable``, ``const``→``enum``, unknown
  keywords such as ``additionalProperties`` dropped, what cannot be expressed
  kept as a note in ``description``). ``tool_choice`` becomes ``toolConfig``.
* Tool calls keep one id across turns: Gemini's ``functionCall.id`` when it
  sends one, else a minted ``call_…``; the same id is sent back on
  ``functionCall`` and ``functionResponse`` (Gemini API; Vertex matches by
  order). ``thoughtSignature``\\ s are remembered per tool-call id and sent
  back with their call; a Gemini 3 turn whose signature is unknown (the
  history came from another provider, or another gateway process) gets the
  documented ``skip_thought_signature_validator`` placeholder.
* Images: ``data:`` URLs become ``inlineData``; ``http(s)://`` and ``gs://``
  URLs become ``fileData`` with the MIME type guessed from the extension: the
  gateway never downloads anything itself (no SSRF, no buffering); Gemini
  fetches the URL, and a model that cannot is an upstream 4xx that falls
  through like any other.
* ``response_format`` becomes ``responseMimeType`` (+ ``responseSchema``).
* ``finishReason``: ``STOP``→``stop`` (``tool_calls`` when the turn called
  functions), ``MAX_TOKENS``→``length``, safety/recitation/blocklist/…→
  ``content_filter``; ``MALFORMED_FUNCTION_CALL``, ``UNEXPECTED_TOOL_CALL``,
  ``OTHER`` and any reason we do not know are a failed step, never a silent
  ``stop``. A prompt blocked outright (``promptFeedback.blockReason``) is a
  400 ``content_filter`` error.
* ``usageMetadata`` becomes ``usage`` (thinking tokens count as completion
  tokens, like OpenAI's reasoning tokens).

Not translated: ``logprobs``/``top_logprobs``, ``logit_bias``, audio output,
images or code-execution parts in answers, ``parallel_tool_calls`` (Gemini
decides), and tools other than functions (a 400 says so).

Native (the Gemini door, :mod:`at_gateway.doors.gemini`): ``send_native`` and
``stream_native`` take the client's own ``GenerateContentRequest`` for
``generateContent`` / ``streamGenerateContent?alt=sse`` / ``countTokens``
unchanged (the provider's ``safety_settings`` added only when the client sent
none) and hand Gemini's answer and events back as they came; the stream is read
only for usage, the finish, error events and an early end.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import mimetypes
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import quote, unquote_to_bytes, urlsplit

from ..config import ProviderConfig, Step
from ..errors import StepFailed
from ..http.pool import Headers, UpstreamClient
from ..http.sse import EventSplitter, encode, event_data
from . import gemini_embed
from .base import Completion, Provider, QuotedFailure, StreamState, config_headers, read_bounded, with_retry_after

API_VERSION = "v1beta"
DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com/" + API_VERSION

# Gemini 3 rejects a function-call turn without a signature; this value is
# documented as the way to vouch for history that has none.
SKIP_SIGNATURE = "skip_thought_signature_validator"

STOP_REASONS = {"STOP": "stop", "MAX_TOKENS": "length"}
FILTER_REASONS = frozenset({
    "SAFETY", "RECITATION", "LANGUAGE", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY",
    "IMAGE_PROHIBITED_CONTENT", "IMAGE_RECITATION", "MODEL_ARMOR",
})
# Everything else (MALFORMED_FUNCTION_CALL, UNEXPECTED_TOOL_CALL, TOO_MANY_TOOL_CALLS,
# MISSING_THOUGHT_SIGNATURE, MALFORMED_RESPONSE, OTHER, NO_IMAGE, IMAGE_OTHER,
# FINISH_REASON_UNSPECIFIED, reasons added later) is an error.

# The keywords of Gemini's Schema object (v1beta) that we emit. ``title``,
# ``default`` and ``example`` exist too but only in recent versions of the API
# (and on some models): titles are dropped, defaults kept as a note.
SCHEMA_KEYS = frozenset({
    "type", "format", "description", "nullable", "enum", "maxItems", "minItems", "properties",
    "required", "minProperties", "maxProperties", "minLength", "maxLength", "pattern", "anyOf",
    "propertyOrdering", "items", "minimum", "maximum",
})
_FORMATS = {"string": {"enum", "date-time"}, "number": {"float", "double"}, "integer": {"int32", "int64"}}
_SCHEMA_TYPES = {"string", "number", "integer", "boolean", "array", "object", "null"}
_MAX_REF_DEPTH = 12

_THINKING_BUDGET = {"none": 0, "minimal": 512, "low": 1024, "medium": 8192, "high": 24576}
_AUDIO_MIME = {"wav": "audio/wav", "mp3": "audio/mp3", "flac": "audio/flac", "ogg": "audio/ogg",
               "aac": "audio/aac", "aiff": "audio/aiff", "pcm16": "audio/pcm", "webm": "audio/webm"}
_GEMINI_VERSION_RE = re.compile(r"gemini-(\d+)")

IdFactory = Callable[[], str]

# The Gemini door's operations (Provider.native): its bodies go to generateContent / countTokens as they are.
GENERATE_OP = "gemini.generate"
COUNT_OP = "gemini.count_tokens"
NATIVE_OPS = frozenset({GENERATE_OP, COUNT_OP})


def _dict(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _str(v: Any) -> str | None:
    return v if isinstance(v, str) and v else None


def _int(v: Any, default: int) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else default


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def bad_request(message: str) -> StepFailed:
    """A request Gemini cannot express: the client's problem, so a 4xx that may fall through."""
    return StepFailed(message, status=400,
                      error={"message": message, "type": "invalid_request_error", "code": "invalid_request"})


class SignatureCache:
    """Thought signatures by tool-call id, bounded, so they can go back with their call.

    Kept in memory per provider: clients speak OpenAI and have nowhere to
    carry a signature, and putting it into the id would make ids too long
    for OpenAI when a later turn falls back to it.
    """

    def __init__(self, limit: int = 8192) -> None:
        self._items: OrderedDict[str, str] = OrderedDict()
        self.limit = limit

    def put(self, call_id: str, signature: str) -> None:
        self._items[call_id] = signature
        self._items.move_to_end(call_id)
        while len(self._items) > self.limit:
            self._items.popitem(last=False)

    def get(self, call_id: str | None) -> str | None:
        return self._items.get(call_id) if call_id else None


def needs_signature(model: str) -> bool:
    """Gemini 3 and later validate thought signatures on function calls; 1.x/2.x do not."""
    m = _GEMINI_VERSION_RE.search(model)
    if m:
        return int(m.group(1)) >= 3
    return "gemini" in model  # aliases such as gemini-flash-latest: assume current


# --------------------------------------------------------------------------
# JSON Schema -> Gemini Schema
# --------------------------------------------------------------------------

def clean_schema(schema: Any) -> dict[str, Any]:
    """A JSON Schema reduced to the OpenAPI subset Gemini's ``Schema`` accepts."""
    if not isinstance(schema, dict):
        return {}
    defs: dict[str, Any] = {}
    for key in ("$defs", "definitions"):
        if isinstance(schema.get(key), dict):
            defs.update({f"#/{key}/{k}": v for k, v in schema[key].items()})
    return _upper_types(_clean(schema, defs, ()))


def _upper_types(node: dict[str, Any]) -> dict[str, Any]:
    """Gemini's ``Type`` enum is upper case on the wire (``OBJECT``), as Google's own SDK sends it."""
    if isinstance(node.get("type"), str):
        node["type"] = node["type"].upper()
    for sub in (node.get("properties") or {}).values():
        _upper_types(sub)
    if isinstance(node.get("items"), dict):
        _upper_types(node["items"])
    for sub in node.get("anyOf") or []:
        _upper_types(sub)
    return node


def _note(out: dict[str, Any], text: str) -> None:
    desc = out.get("description")
    out["description"] = f"{desc} ({text})" if isinstance(desc, str) and desc else f"({text})"


def _merge_all_of(node: dict[str, Any]) -> dict[str, Any]:
    merged = {k: v for k, v in node.items() if k != "allOf"}
    for sub in node.get("allOf") or []:
        if not isinstance(sub, dict):
            continue
        for k, v in sub.items():
            if k == "properties" and isinstance(v, dict):
                merged["properties"] = {**(merged.get("properties") or {}), **v}
            elif k == "required" and isinstance(v, list):
                merged["required"] = [*(merged.get("required") or []), *[r for r in v
                                                                         if r not in (merged.get("required") or [])]]
            else:
                merged.setdefault(k, v)
    return merged


def _clean(node: Any, defs: dict[str, Any], refs: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(node, dict):
        return {}
    ref = node.get("$ref")
    if isinstance(ref, str):
        target = defs.get(ref)
        if target is None or ref in refs or len(refs) >= _MAX_REF_DEPTH:
            out: dict[str, Any] = {"type": "object"}
            _note(out, f"recursive reference to {ref.rsplit('/', 1)[-1]}" if ref in refs else f"reference {ref}")
            if isinstance(node.get("description"), str):
                out["description"] = node["description"]
            return out
        extra = {k: v for k, v in node.items() if k != "$ref"}
        return _clean({**target, **extra}, defs, (*refs, ref))
    if isinstance(node.get("allOf"), list):
        node = _merge_all_of(node)

    out = {}
    # Types: a list with "null" becomes nullable; several real types become anyOf.
    typ = node.get("type")
    if isinstance(typ, str):
        typ = typ.lower()
    if isinstance(typ, list):
        types = [t.lower() for t in typ if isinstance(t, str)]
        if "null" in types:
            out["nullable"] = True
        real = [t for t in types if t != "null"]
        if len(real) == 1:
            typ = real[0]
        elif len(real) > 1:
            rest = {k: v for k, v in node.items() if k not in ("type", "description")}
            out["anyOf"] = [_clean({**rest, "type": t}, defs, refs) for t in real]
            typ = None
        else:
            typ = None
    if isinstance(typ, str) and typ in _SCHEMA_TYPES:
        out["type"] = typ

    variants = node.get("anyOf") if isinstance(node.get("anyOf"), list) else node.get("oneOf")
    if isinstance(variants, list):
        subs = []
        for v in variants:
            if isinstance(v, dict) and str(v.get("type")).lower() == "null" and len(v) == 1:
                out["nullable"] = True
                continue
            subs.append(_clean(v, defs, refs))
        if len(subs) == 1:
            # Optional[X]: X itself, nullable; the outer description wins.
            inner = subs[0]
            for k, v in inner.items():
                if k == "description" and isinstance(node.get("description"), str):
                    continue
                out.setdefault(k, v)
        elif subs:
            out["anyOf"] = subs

    if isinstance(node.get("description"), str) and node["description"] and "description" not in out:
        out["description"] = node["description"]
    if isinstance(node.get("pattern"), str):
        out["pattern"] = node["pattern"]
    if isinstance(node.get("propertyOrdering"), list):
        out["propertyOrdering"] = [p for p in node["propertyOrdering"] if isinstance(p, str)]
    for key in ("minItems", "maxItems", "minLength", "maxLength", "minProperties", "maxProperties",
                "minimum", "maximum"):
        v = node.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = v
    for key, op in (("exclusiveMinimum", ">"), ("exclusiveMaximum", "<")):
        v = node.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            _note(out, f"must be {op} {v}")
    if isinstance(node.get("multipleOf"), (int, float)):
        _note(out, f"a multiple of {node['multipleOf']}")
    if node.get("default") is not None:
        _note(out, "default: " + json.dumps(node["default"], ensure_ascii=False))

    # enum and const: Gemini enumerates strings only.
    values = None
    if isinstance(node.get("enum"), list):
        values = node["enum"]
    elif "const" in node:
        values = [node["const"]]
    if values is not None:
        strings = [v for v in values if isinstance(v, str)]
        if strings and len(strings) == len([v for v in values if v is not None]):
            out["enum"] = strings
            out.setdefault("type", "string")
            if None in values:
                out["nullable"] = True
        else:
            _note(out, "one of " + ", ".join(json.dumps(v) for v in values))

    fmt = node.get("format")
    if isinstance(fmt, str):
        if fmt in _FORMATS.get(str(out.get("type")), set()):
            out["format"] = fmt
        else:
            _note(out, f"format: {fmt}")

    props = node.get("properties")
    if isinstance(props, dict) and props:
        out["properties"] = {str(k): _clean(v, defs, refs) for k, v in props.items()}
        out.setdefault("type", "object")
        req = node.get("required")
        if isinstance(req, list):
            kept = [r for r in req if isinstance(r, str) and r in out["properties"]]
            if kept:
                out["required"] = kept
    items = node.get("items")
    if isinstance(items, dict):
        out["items"] = _clean(items, defs, refs)
        out.setdefault("type", "array")
    elif isinstance(items, list) and items:
        subs = [_clean(i, defs, refs) for i in items]
        out["items"] = subs[0] if len(subs) == 1 else {"anyOf": subs}
        out.setdefault("type", "array")
    elif isinstance(node.get("prefixItems"), list) and node["prefixItems"]:
        subs = [_clean(i, defs, refs) for i in node["prefixItems"]]
        out["items"] = subs[0] if len(subs) == 1 else {"anyOf": subs}
        out.setdefault("type", "array")
    if out.get("type") == "array" and "items" not in out:
        out["items"] = {"type": "string"}  # Gemini requires items for arrays
    return out


# --------------------------------------------------------------------------
# OpenAI request -> Gemini request
# --------------------------------------------------------------------------

def _parse_data_url(url: str, where: str) -> tuple[str, str]:
    """``data:<mime>[;…][;base64],<data>`` -> (mime, base64 data)."""
    head, sep, data = url[5:].partition(",")
    if not sep:
        raise bad_request(f"{where}: malformed data URL (no comma)")
    params = head.split(";")
    mime = params[0].strip() or "text/plain"
    if "base64" in (p.strip().lower() for p in params[1:]):
        cleaned = "".join(data.split())
        try:
            base64.b64decode(cleaned + "=" * (-len(cleaned) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise bad_request(f"{where}: the data URL is not valid base64") from None
        return mime, cleaned
    return mime, base64.b64encode(unquote_to_bytes(data)).decode()


def _guess_mime(url: str, default: str) -> str:
    path = urlsplit(url).path
    mime, _ = mimetypes.guess_type(path)
    return mime or default


def _media_part(url: Any, where: str, default_mime: str = "image/jpeg") -> dict[str, Any]:
    if not isinstance(url, str) or not url:
        raise bad_request(f"{where}: url must be a non-empty string")
    if url.startswith("data:"):
        mime, data = _parse_data_url(url, where)
        return {"inlineData": {"mimeType": mime, "data": data}}
    scheme = url.split(":", 1)[0].lower()
    if scheme in ("http", "https", "gs"):
        return {"fileData": {"mimeType": _guess_mime(url, default_mime), "fileUri": url}}
    raise bad_request(f"{where}: unsupported URL scheme {scheme!r} (use a data:, http(s):// or gs:// URL)")


def _content_parts(content: Any, where: str, allow_media: bool) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"text": content}] if content else []
    if not isinstance(content, list):
        raise bad_request(f"{where}.content must be a string or an array of content parts")
    parts: list[dict[str, Any]] = []
    for k, p in enumerate(content):
        pw = f"{where}.content[{k}]"
        if isinstance(p, str):
            if p:
                parts.append({"text": p})
            continue
        if not isinstance(p, dict):
            raise bad_request(f"{pw} must be an object")
        kind = p.get("type")
        if kind in ("text", "refusal"):
            text = p.get(kind)
            if not isinstance(text, str):
                raise bad_request(f"{pw}.{kind} must be a string")
            if text:
                parts.append({"text": text})
        elif not allow_media:
            raise bad_request(f"{pw}: content parts of type {kind!r} are not allowed in this message")
        elif kind == "image_url":
            img = p.get("image_url")
            url = img.get("url") if isinstance(img, dict) else img
            parts.append(_media_part(url, f"{pw}.image_url"))
        elif kind == "input_audio":
            audio = _dict(p.get("input_audio"))
            data, fmt = audio.get("data"), str(audio.get("format") or "wav").lower()
            if not isinstance(data, str) or not data:
                raise bad_request(f"{pw}.input_audio.data must be base64 audio")
            parts.append({"inlineData": {"mimeType": _AUDIO_MIME.get(fmt, f"audio/{fmt}"), "data": data}})
        elif kind == "file":
            f = _dict(p.get("file"))
            data, file_id = f.get("file_data"), f.get("file_id")
            if isinstance(data, str) and data.startswith("data:"):
                parts.append(_media_part(data, f"{pw}.file.file_data"))
            elif isinstance(data, str) and data:
                mime = _guess_mime(str(f.get("filename") or ""), "application/pdf")
                parts.append({"inlineData": {"mimeType": mime, "data": "".join(data.split())}})
            elif isinstance(file_id, str) and "://" in file_id:
                parts.append({"fileData": {"mimeType": _guess_mime(file_id, "application/pdf"), "fileUri": file_id}})
            else:
                raise bad_request(f"{pw}.file needs file_data (base64 or a data URL) or a file_id URI")
        else:
            raise bad_request(f"{pw}: content part type {kind!r} is not supported by Gemini")
    return parts


def _tool_response(content: Any, where: str) -> dict[str, Any]:
    """A tool message's content as the JSON object ``functionResponse.response`` needs."""
    if isinstance(content, list):
        texts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        content = "".join(t for t in texts if isinstance(t, str))
    if content is None:
        content = ""
    if not isinstance(content, str):
        raise bad_request(f"{where}.content must be a string")
    # JSON objects and arrays go structured; anything else stays the text it was.
    if content[:1] in ("{", "["):
        try:
            value = json.loads(content)
        except ValueError:
            value = None
        if isinstance(value, dict):
            return value
        if isinstance(value, list):
            return {"output": value}
    return {"output": content}


def _parse_arguments(raw: Any, where: str) -> dict[str, Any]:
    if isinstance(raw, dict):
        return raw
    if raw is None or raw == "":
        return {}
    if not isinstance(raw, str):
        raise bad_request(f"{where}.arguments must be a JSON string")
    try:
        args = json.loads(raw)
    except ValueError:
        raise bad_request(f"{where}.arguments is not valid JSON") from None
    if not isinstance(args, dict):
        raise bad_request(f"{where}.arguments must be a JSON object")
    return args


class _Contents:
    """Builds ``contents``, merging consecutive turns of one role (tool results stay their own turn)."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self._kinds: list[str] = []

    def add(self, role: str, parts: list[dict[str, Any]], kind: str) -> None:
        if not parts:
            return
        if self.items and self.items[-1]["role"] == role and self._kinds[-1] == kind:
            self.items[-1]["parts"].extend(parts)
            return
        self.items.append({"role": role, "parts": parts})
        self._kinds.append(kind)


def build_request(body: dict[str, Any], model: str, *, send_ids: bool = True,
                  signatures: SignatureCache | None = None,
                  safety_settings: list[Any] | None = None) -> dict[str, Any]:
    """The Gemini ``GenerateContentRequest`` for an OpenAI chat-completions body."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty array")
    system: list[dict[str, Any]] = []
    contents = _Contents()
    names: dict[str, str] = {}
    order: dict[str, int] = {}  # call id -> its place among its model turn's calls
    ranks: dict[int, int] = {}  # id(functionResponse part) -> its call's place (only when ids are not sent)
    vouch = needs_signature(model)
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise bad_request(f"{where} must be an object")
        role = msg.get("role")
        if role in ("system", "developer"):
            system += _content_parts(msg.get("content"), where, allow_media=False)
        elif role == "user":
            contents.add("user", _content_parts(msg.get("content"), where, allow_media=True), "msg")
        elif role == "assistant":
            parts = _content_parts(msg.get("content"), where, allow_media=False)
            calls = msg.get("tool_calls") or []
            if not isinstance(calls, list):
                raise bad_request(f"{where}.tool_calls must be an array")
            legacy = msg.get("function_call")
            if isinstance(legacy, dict) and not calls:
                calls = [{"id": None, "type": "function", "function": legacy}]
            call_parts: list[dict[str, Any]] = []
            signed = False
            for j, tc in enumerate(calls):
                tw = f"{where}.tool_calls[{j}]"
                fn = tc.get("function") if isinstance(tc, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
                    raise bad_request(f"{tw}.function.name is required")
                call_id = tc.get("id") if isinstance(tc.get("id"), str) and tc.get("id") else None
                args = _parse_arguments(fn.get("arguments"), f"{tw}.function")
                fc: dict[str, Any] = {"name": fn["name"], "args": args}
                if send_ids and call_id:
                    fc["id"] = call_id
                part: dict[str, Any] = {"functionCall": fc}
                sig = signatures.get(call_id) if signatures is not None else None
                if sig:
                    part["thoughtSignature"] = sig
                    signed = True
                if call_id:
                    names[call_id] = fn["name"]
                    order[call_id] = j
                call_parts.append(part)
            if call_parts and vouch and not signed:
                call_parts[0]["thoughtSignature"] = SKIP_SIGNATURE
            contents.add("model", parts + call_parts, "msg")
        elif role in ("tool", "function"):
            call_id = msg.get("tool_call_id") if isinstance(msg.get("tool_call_id"), str) else None
            name = names.get(call_id or "") or msg.get("name")
            if not isinstance(name, str) or not name:
                raise bad_request(f"{where}: tool_call_id {call_id!r} matches no tool call of an earlier "
                                  "assistant message (Gemini needs the function name)")
            fr: dict[str, Any] = {"name": name, "response": _tool_response(msg.get("content"), where)}
            if send_ids and call_id:
                fr["id"] = call_id
            part = {"functionResponse": fr}
            if not send_ids:
                ranks[id(part)] = order.get(call_id or "", len(order))
            contents.add("user", [part], "tool")
        else:
            raise bad_request(f"{where}.role {role!r} is not supported")

    if ranks:
        # Without ids, responses pair with calls by position: put them in the order of the calls, as the
        # client's tool messages may come in any order (their tool_call_id pairs them for OpenAI).
        for item, kind in zip(contents.items, contents._kinds, strict=True):
            if kind == "tool":
                item["parts"].sort(key=lambda p: ranks.get(id(p), len(order)))
    req: dict[str, Any] = {}
    if not contents.items:
        # Only instructions: Gemini needs a user turn, so they become it.
        if not system:
            raise bad_request("the messages have no content to send")
        contents.add("user", system, "msg")
        system = []
    req["contents"] = contents.items
    if system:
        req["systemInstruction"] = {"parts": system}

    tools = _build_tools(body)
    if tools:
        req["tools"] = [{"functionDeclarations": tools}]
    tool_config = _build_tool_config(body.get("tool_choice") or body.get("function_call"))
    if tool_config and tools:
        req["toolConfig"] = tool_config

    gen = _generation_config(body, model)
    if gen:
        req["generationConfig"] = gen
    if safety_settings:
        req["safetySettings"] = safety_settings
    return req


def _build_tools(body: dict[str, Any]) -> list[dict[str, Any]]:
    decls: list[dict[str, Any]] = []
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise bad_request("'tools' must be an array")
    functions = body.get("functions")
    if functions is not None and not isinstance(functions, list):
        raise bad_request("'functions' must be an array")
    items: list[tuple[str, Any]] = [(f"tools[{i}]", t) for i, t in enumerate(tools or [])]
    if not tools:
        items += [(f"functions[{i}]", {"type": "function", "function": f}) for i, f in enumerate(functions or [])]
    for where, t in items:
        if not isinstance(t, dict):
            raise bad_request(f"{where} must be an object")
        if t.get("type", "function") != "function":
            raise bad_request(f"{where}: tool type {t.get('type')!r} is not supported by Gemini (only function)")
        fn = t.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise bad_request(f"{where}.function.name is required")
        decl: dict[str, Any] = {"name": fn["name"]}
        if isinstance(fn.get("description"), str) and fn["description"]:
            decl["description"] = fn["description"]
        params = clean_schema(fn.get("parameters"))
        if params.get("properties"):
            decl["parameters"] = params
        decls.append(decl)
    return decls


def _build_tool_config(choice: Any) -> dict[str, Any] | None:
    if choice is None:
        return None
    if choice == "auto":
        return {"functionCallingConfig": {"mode": "AUTO"}}
    if choice == "none":
        return {"functionCallingConfig": {"mode": "NONE"}}
    if choice in ("required", "any"):
        return {"functionCallingConfig": {"mode": "ANY"}}
    if isinstance(choice, dict):
        fn = _dict(choice.get("function")) or choice
        name = fn.get("name")
        if isinstance(name, str) and name:
            return {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": [name]}}
    raise bad_request(f"tool_choice {choice!r} is not supported")


def _number(body: dict[str, Any], key: str) -> float | int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise bad_request(f"'{key}' must be a number")
    return v


def _generation_config(body: dict[str, Any], model: str) -> dict[str, Any]:
    gen: dict[str, Any] = {}
    for src, dst in (("temperature", "temperature"), ("top_p", "topP"), ("top_k", "topK"),
                     ("presence_penalty", "presencePenalty"), ("frequency_penalty", "frequencyPenalty"),
                     ("seed", "seed")):
        v = _number(body, src)
        if v is not None:
            gen[dst] = v
    max_tokens = _number(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens")
    if max_tokens is not None:
        gen["maxOutputTokens"] = int(max_tokens)
    n = _number(body, "n")
    if n is not None and n != 1:
        gen["candidateCount"] = int(n)
    stop = body.get("stop")
    if isinstance(stop, str) and stop:
        gen["stopSequences"] = [stop]
    elif isinstance(stop, list) and stop:
        if not all(isinstance(s, str) for s in stop):
            raise bad_request("'stop' must be a string or an array of strings")
        gen["stopSequences"] = stop

    fmt = body.get("response_format")
    if isinstance(fmt, dict):
        kind = fmt.get("type")
        if kind == "json_object":
            gen["responseMimeType"] = "application/json"
        elif kind == "json_schema":
            gen["responseMimeType"] = "application/json"
            js = _dict(fmt.get("json_schema"))
            schema = clean_schema(js.get("schema"))
            if schema:
                gen["responseSchema"] = schema
        elif kind not in (None, "text"):
            raise bad_request(f"response_format type {kind!r} is not supported")
    elif fmt is not None:
        raise bad_request("'response_format' must be an object")

    effort = body.get("reasoning_effort")
    if isinstance(effort, str) and effort:
        if effort not in _THINKING_BUDGET:
            raise bad_request(f"reasoning_effort {effort!r} is not supported")
        if needs_signature(model):  # Gemini 3: levels instead of budgets
            level = "minimal" if effort == "none" else effort
            gen["thinkingConfig"] = {"thinkingLevel": level, "includeThoughts": effort != "none"}
        else:
            gen["thinkingConfig"] = {"thinkingBudget": _THINKING_BUDGET[effort], "includeThoughts": effort != "none"}
    return gen


# --------------------------------------------------------------------------
# Gemini response -> OpenAI
# --------------------------------------------------------------------------

def _error_type(status: int | None) -> str:
    if status == 400 or status == 404 or status == 413 or status == 422:
        return "invalid_request_error"
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 429:
        return "rate_limit_error"
    return "upstream_error"


def error_from_gemini(status: int | None, data: Any, where: str = "") -> StepFailed:
    """A Google API error (``{"error": {code, message, status}}``) as a failed step with an OpenAI error."""
    err: Any = data
    if isinstance(err, list) and err and isinstance(err[0], dict):
        err = err[0]
    if isinstance(err, dict) and "error" in err:
        err = err["error"]
    message, code = "", None
    if isinstance(err, dict):
        message = str(err.get("message") or "")
        if isinstance(err.get("status"), str):
            code = err["status"].lower()
        if status is None and isinstance(err.get("code"), int) and 400 <= err["code"] < 600:
            status = err["code"]
    elif isinstance(err, str):
        message = err
    if not message:
        message = "(no message)"
    prefix = f"HTTP {status}: " if status and not where else where
    error = {"message": message, "type": _error_type(status), "code": code or "upstream_error"}
    return StepFailed(prefix + message, status=status, error=error)


async def read_error(resp: Any, limit: int = 65536) -> StepFailed:
    """Read a bounded error body and turn it into StepFailed."""
    raw = await read_bounded(resp, limit)
    try:
        data: Any = json.loads(raw)
    except ValueError:
        if not raw.strip():
            return with_retry_after(error_from_gemini(resp.status, "(empty body)"), resp)
        # Whole: routing redacts secrets by value and only then shortens; a cut here could split an
        # echoed key so that redaction misses it and its start leaks.
        return with_retry_after(QuotedFailure(f"HTTP {resp.status}", raw.strip(), status=resp.status, error={
            "message": "error body is not JSON", "type": _error_type(resp.status), "code": "upstream_error"}), resp)
    return with_retry_after(error_from_gemini(resp.status, data), resp)


def usage_from_gemini(meta: Any) -> dict[str, Any] | None:
    if not isinstance(meta, dict):
        return None

    def n(key: str) -> int:
        v = meta.get(key)
        return v if isinstance(v, int) and not isinstance(v, bool) else 0

    prompt = n("promptTokenCount") + n("toolUsePromptTokenCount")
    thoughts = n("thoughtsTokenCount")
    completion = n("candidatesTokenCount") + thoughts
    usage: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                             "total_tokens": n("totalTokenCount") or prompt + completion}
    if n("cachedContentTokenCount"):
        usage["prompt_tokens_details"] = {"cached_tokens": n("cachedContentTokenCount")}
    if thoughts:
        usage["completion_tokens_details"] = {"reasoning_tokens": thoughts}
    return usage


def finish_reason(reason: Any, message: Any, has_calls: bool) -> str:
    """Gemini's finishReason as OpenAI's; raises for the reasons that mean the answer is broken."""
    if not isinstance(reason, str):
        reason = json.dumps(reason)  # not a reason at all: a failed step below, never a TypeError
    if reason in STOP_REASONS:
        mapped = STOP_REASONS[reason]
        return "tool_calls" if has_calls and mapped == "stop" else mapped
    if reason in FILTER_REASONS:
        return "content_filter"
    text = f"Gemini stopped with finishReason {reason}"
    error = {"message": text, "type": "upstream_error", "code": str(reason).lower()}
    if isinstance(message, str) and message:
        raise QuotedFailure(text, message, error=error)  # whole: routing redacts it, then shortens it
    raise StepFailed(text, error=error)


def check_prompt_blocked(obj: dict[str, Any]) -> None:
    feedback = obj.get("promptFeedback")
    block = feedback.get("blockReason") if isinstance(feedback, dict) else None
    if block:
        text = f"Gemini blocked the prompt (blockReason {block})"
        raise StepFailed(text, status=400,
                         error={"message": text, "type": "invalid_request_error", "code": "content_filter"})


class _Parts:
    """One candidate's parts, split the OpenAI way."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.reasoning: list[str] = []
        self.calls: list[dict[str, Any]] = []


def _read_parts(cand: dict[str, Any], new_id: IdFactory, signatures: SignatureCache | None) -> _Parts:
    out = _Parts()
    content = cand.get("content")
    parts = content.get("parts") if isinstance(content, dict) else None
    for part in parts if isinstance(parts, list) else []:
        if not isinstance(part, dict):
            continue
        sig = part.get("thoughtSignature") if isinstance(part.get("thoughtSignature"), str) else None
        fc = part.get("functionCall")
        if isinstance(fc, dict):
            call_id = _str(fc.get("id")) or new_id()
            if sig and signatures is not None:
                signatures.put(call_id, sig)
            args = fc.get("args") if isinstance(fc.get("args"), dict) else {}
            out.calls.append({"id": call_id, "type": "function",
                              "function": {"name": str(fc.get("name") or ""),
                                           "arguments": json.dumps(args, ensure_ascii=False, separators=(",", ":"))}})
        elif isinstance(part.get("text"), str):
            if part.get("thought") is True:
                out.reasoning.append(part["text"])
            else:
                out.text.append(part["text"])
    return out


def completion_from_gemini(obj: Any, model: str, new_id: IdFactory = new_call_id,
                           signatures: SignatureCache | None = None,
                           created: int | None = None) -> dict[str, Any]:
    """A Gemini ``GenerateContentResponse`` as an OpenAI ``chat.completion``."""
    if not isinstance(obj, dict):
        raise StepFailed("Gemini answered 2xx with JSON that is not an object")
    if obj.get("error"):
        raise error_from_gemini(None, obj, "Gemini answered 2xx with an error: ")
    cands = obj.get("candidates")
    if not isinstance(cands, list) or not cands:
        check_prompt_blocked(obj)
        raise StepFailed("Gemini answered 2xx without candidates")
    choices = []
    for pos, cand in enumerate(cands):
        if not isinstance(cand, dict):
            raise StepFailed("Gemini sent a candidate that is not an object")
        parts = _read_parts(cand, new_id, signatures)
        reason = cand.get("finishReason")
        if reason is None:
            if not (parts.text or parts.calls):
                raise StepFailed("Gemini answered with an empty candidate and no finishReason")
            reason = "STOP"
        fin = finish_reason(reason, cand.get("finishMessage"), bool(parts.calls))
        text = "".join(parts.text)
        message: dict[str, Any] = {"role": "assistant", "content": text if text or not parts.calls else None}
        if parts.reasoning:
            message["reasoning_content"] = "".join(parts.reasoning)
        if parts.calls:
            message["tool_calls"] = parts.calls
        index = _int(cand.get("index"), pos)
        choices.append({"index": index, "message": message, "finish_reason": fin})
    rid = obj.get("responseId")
    out: dict[str, Any] = {
        "id": f"chatcmpl-{rid}" if isinstance(rid, str) and rid else "chatcmpl-" + secrets.token_hex(12),
        "object": "chat.completion",
        "created": int(time.time()) if created is None else created,
        "model": obj.get("modelVersion") if isinstance(obj.get("modelVersion"), str) else model,
        "choices": choices,
    }
    usage = usage_from_gemini(obj.get("usageMetadata"))
    if usage is not None:
        out["usage"] = usage
    return out


class StreamTranslator:
    """Gemini stream events in, OpenAI ``chat.completion.chunk`` objects out.

    Gemini sends each function call whole, so a tool call is one delta with
    its ``index``, ``id``, ``name`` and complete ``arguments``.
    """

    def __init__(self, model: str, new_id: IdFactory = new_call_id, signatures: SignatureCache | None = None,
                 created: int | None = None) -> None:
        self.model = model
        self.new_id = new_id
        self.signatures = signatures
        self.id = "chatcmpl-" + secrets.token_hex(12)
        self.created = int(time.time()) if created is None else created
        self.usage: dict[str, Any] | None = None
        self.finish: dict[int, str] = {}
        self.started: set[int] = set()
        self.tool_count: dict[int, int] = {}
        self.events = 0

    def _chunk(self, index: int, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": index, "delta": delta, "finish_reason": finish}]}

    def _delta(self, index: int, delta: dict[str, Any]) -> dict[str, Any]:
        if index not in self.started:
            self.started.add(index)
            delta = {"role": "assistant", **delta}
        return self._chunk(index, delta)

    def feed(self, obj: Any) -> list[dict[str, Any]]:
        if not isinstance(obj, dict):
            raise StepFailed("Gemini sent a stream event that is not a JSON object")
        if obj.get("error"):
            raise error_from_gemini(None, obj, "Gemini stream error: ")
        if self.events == 0:
            rid = obj.get("responseId")
            if isinstance(rid, str) and rid:
                self.id = f"chatcmpl-{rid}"
            if isinstance(obj.get("modelVersion"), str):
                self.model = obj["modelVersion"]
        self.events += 1
        usage = usage_from_gemini(obj.get("usageMetadata"))
        if usage is not None:
            self.usage = usage
        cands = obj.get("candidates")
        if not isinstance(cands, list) or not cands:
            check_prompt_blocked(obj)
            return []
        out: list[dict[str, Any]] = []
        for pos, cand in enumerate(cands):
            if not isinstance(cand, dict):
                raise StepFailed("Gemini sent a candidate that is not an object")
            index = _int(cand.get("index"), pos)
            if index in self.finish:
                continue
            parts = _read_parts(cand, self.new_id, self.signatures)
            if parts.reasoning:
                out.append(self._delta(index, {"reasoning_content": "".join(parts.reasoning)}))
            if parts.text:
                out.append(self._delta(index, {"content": "".join(parts.text)}))
            if parts.calls:
                calls = []
                for call in parts.calls:
                    n = self.tool_count.get(index, 0)
                    self.tool_count[index] = n + 1
                    calls.append({"index": n, **call})
                out.append(self._delta(index, {"tool_calls": calls}))
            reason = cand.get("finishReason")
            if reason is not None:
                fin = finish_reason(reason, cand.get("finishMessage"), self.tool_count.get(index, 0) > 0)
                if index not in self.started:
                    out.append(self._delta(index, {"content": ""}))
                self.finish[index] = fin
                out.append(self._chunk(index, {}, fin))
        return out

    def close(self, include_usage: bool) -> list[dict[str, Any]]:
        """At the end of the upstream stream: raises unless every candidate finished."""
        if not self.finish:
            if not self.started:
                raise StepFailed("Gemini stream ended before its first chunk")
            raise StepFailed("Gemini stream ended before it was complete (no finishReason)")
        unfinished = self.started - set(self.finish)
        if unfinished:
            raise StepFailed(f"Gemini stream ended before candidate {min(unfinished)} finished")
        if include_usage and self.usage is not None:
            return [{"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                     "model": self.model, "choices": [], "usage": self.usage}]
        return []


# --------------------------------------------------------------------------
# The provider
# --------------------------------------------------------------------------

def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def model_path(model: str) -> str:
    """``gemini-2.5-flash`` or ``models/gemini-2.5-flash`` -> a URL-safe model id."""
    if model.startswith("models/"):
        model = model[len("models/"):]
    return quote(model, safe="-._~@")


def versioned_base(base_url: str | None, default: str, version: str) -> str:
    """The configured base URL, with the API version appended when it names none."""
    if not base_url:
        return default
    base = base_url.rstrip("/")
    if urlsplit(base).path in ("", "/"):
        base += "/" + version
    return base


class GeminiProvider(Provider):
    type_name = "gemini"
    send_ids = True  # the Gemini API matches functionResponse to functionCall by id

    def __init__(self, cfg: ProviderConfig, client: UpstreamClient) -> None:
        super().__init__(cfg, client)
        self.base = versioned_base(cfg.base_url, DEFAULT_BASE_URL, API_VERSION)
        headers: Headers = [(b"content-type", b"application/json")]
        if cfg.api_key:
            headers.append((b"x-goog-api-key", cfg.api_key.encode()))
        headers += config_headers(cfg)
        self.headers = headers
        safety = cfg.options.get("safety_settings")
        self.safety_settings = safety if isinstance(safety, list) else None
        self.signatures = SignatureCache()

    # Vertex overrides these: where to send, how to authenticate, what a 401 means, how countTokens is asked.
    async def method_url(self, step: Step, method: str) -> str:
        """The URL of one of the model's methods (``generateContent``, ``countTokens``, ...)."""
        return f"{self.base}/models/{model_path(step.model)}:{method}"

    async def endpoint(self, step: Step, stream: bool) -> str:
        return await self.method_url(step, "streamGenerateContent?alt=sse" if stream else "generateContent")

    async def auth_headers(self) -> Headers:
        return []

    def on_unauthorized(self, headers: Headers) -> None:
        """Called on a 401 (Vertex drops its cached token)."""

    async def embed(self, body: dict[str, Any], step: Step) -> Completion:
        """OpenAI's embeddings request as ``batchEmbedContents`` (Vertex: its own endpoint), see
        :mod:`.gemini_embed`."""
        return await gemini_embed.embed(self, body, step)

    # -- the Gemini door's requests, passed through (at_gateway/doors/gemini.py) ------------------------------
    def native(self, op: str, step: Step) -> bool:
        return op in NATIVE_OPS

    def count_body(self, body: dict[str, Any], step: Step) -> dict[str, Any]:
        """A countTokens body as the Gemini API takes it: ``contents`` alone, or the whole request as
        ``generateContentRequest`` naming the step's model (Vertex overrides: its fields at the top level)."""
        inner = body.get("generateContentRequest", body.get("generate_content_request"))
        if isinstance(inner, dict):
            return {"generateContentRequest": {**inner, "model": "models/" + step.model.removeprefix("models/")}}
        if set(body) <= {"contents"}:
            return body
        return {"generateContentRequest": {**body, "model": "models/" + step.model.removeprefix("models/")}}

    def _native_data(self, op: str, body: dict[str, Any], step: Step) -> bytes:
        if op == COUNT_OP:
            return _dumps(self.count_body(body, step))
        if self.safety_settings and "safetySettings" not in body and "safety_settings" not in body:
            body = {**body, "safetySettings": self.safety_settings}  # the operator's default, as on chat requests
        return _dumps(body)

    async def send_native(self, op: str, body: dict[str, Any], step: Step, headers: Headers) -> Completion:
        """generateContent or countTokens with the client's own body; Gemini's answer passed on as it came (a
        blocked prompt or an unusual finishReason is the client's to read, in the format it speaks)."""
        if op not in NATIVE_OPS:
            return await super().send_native(op, body, step, headers)
        data = self._native_data(op, body, step)
        method = "countTokens" if op == COUNT_OP else "generateContent"
        raw, obj = await self._post(lambda: self.method_url(step, method), data)
        if not isinstance(obj, dict):
            raise StepFailed("Gemini answered 2xx with JSON that is not an object")
        if obj.get("error"):
            raise error_from_gemini(None, obj, "Gemini answered 2xx with an error: ")
        return Completion(raw, None if op == COUNT_OP else usage_from_gemini(obj.get("usageMetadata")))

    async def stream_native(self, op: str, body: dict[str, Any], step: Step, state: StreamState,
                            headers: Headers) -> AsyncIterator[bytes]:
        """streamGenerateContent with the client's body: Gemini's events passed on as they come, read only for
        usage, the finish and errors (an error event, or an end before every candidate finished, fails)."""
        if op != GENERATE_OP:
            raise StepFailed(f"provider type {self.type_name!r} does not stream {op}", status=400)
        data = self._native_data(op, body, step)
        watch = _NativeWatch(state)
        async with self._sse(step, data) as resp:
            splitter = EventSplitter()
            async for raw in resp.aiter_raw():
                events = splitter.feed(raw)
                if not events:
                    continue
                out, failure = watch.events(events)
                if out:
                    yield out
                if failure is not None:
                    raise failure
            tail = splitter.pending
        out, failure = watch.events([tail + b"\n\n"] if tail.strip() else [])
        if out:
            yield out
        if failure is not None:
            raise failure
        watch.close()

    def build(self, body: dict[str, Any], step: Step) -> bytes:
        return _dumps(build_request(body, step.model, send_ids=self.send_ids, signatures=self.signatures,
                                    safety_settings=self.safety_settings))

    async def _post(self, where: Callable[[], Awaitable[str]], data: bytes) -> tuple[bytes, Any]:
        """One whole-answer call: its bytes and decoded JSON (a failed step for an error status or garbage).
        ``where`` (the URL) is awaited after the credentials, as every call of this provider asks them."""
        auth = await self.auth_headers()
        url = await where()
        async with self.client.stream(b"POST", url, [*self.headers, (b"accept", b"application/json"), *auth], data,
                                      self.cfg.proxy) as resp:
            if not 200 <= resp.status < 300:
                if resp.status == 401:
                    self.on_unauthorized(auth)
                raise await read_error(resp)
            raw = await resp.read()
        try:
            return raw, json.loads(raw)
        except ValueError:
            raise QuotedFailure("Gemini answered 2xx with a body that is not JSON", raw) from None

    @contextlib.asynccontextmanager
    async def _sse(self, step: Step, data: bytes) -> AsyncIterator[Any]:
        """A streamGenerateContent call whose answer is a 2xx event stream (else a failed step, after telling
        the credentials of a 401)."""
        auth = await self.auth_headers()
        url = await self.endpoint(step, True)
        async with self.client.stream(b"POST", url, [*self.headers, (b"accept", b"text/event-stream"), *auth], data,
                                      self.cfg.proxy) as resp:
            if not 200 <= resp.status < 300:
                if resp.status == 401:
                    self.on_unauthorized(auth)
                raise await read_error(resp)
            await _require_sse(resp)
            yield resp

    async def complete(self, body: dict[str, Any], step: Step) -> Completion:
        _, obj = await self._post(lambda: self.endpoint(step, False), self.build(body, step))
        out = completion_from_gemini(obj, step.model, signatures=self.signatures)
        return Completion(_dumps(out), out.get("usage"))

    async def stream(self, body: dict[str, Any], step: Step, state: StreamState) -> AsyncIterator[bytes]:
        data = self.build(body, step)
        tr = StreamTranslator(step.model, signatures=self.signatures)
        async with self._sse(step, data) as resp:
            splitter = EventSplitter()
            async for raw in resp.aiter_raw():
                out, failure = _translate_events(tr, splitter.feed(raw))
                if out:
                    state.usage = tr.usage
                    yield out
                if failure is not None:
                    raise failure
            tail = splitter.pending
        # An unterminated last event still counts if it is whole JSON.
        out, failure = _translate_events(tr, [tail + b"\n\n"] if tail.strip() else [])
        if failure is not None:
            if out:
                yield out
            raise failure
        final = out + b"".join(encode(c) for c in tr.close(state.include_usage))
        state.usage = tr.usage
        state.finish_reason = tr.finish.get(0) or next(iter(tr.finish.values()))
        if final:
            yield final


async def _require_sse(resp: Any) -> None:
    """A 2xx answer to a stream request that is not SSE: Gemini's error (in a JSON body or array), or a failure."""
    ctype = resp.header(b"content-type") or b""
    if b"text/event-stream" in ctype:
        return
    raw = await read_bounded(resp)
    try:
        obj: Any = json.loads(raw)
    except ValueError:
        obj = None
    if isinstance(obj, (dict, list)) and (isinstance(obj, list) or obj.get("error")):
        raise error_from_gemini(None, obj, "Gemini answered 2xx with an error: ")
    raise StepFailed(f"Gemini did not stream (content-type {ctype.decode('latin-1')!r})")


class _NativeWatch:
    """What a passed-through Gemini stream says about itself: its usage and finish (into the StreamState, for
    accounting and the log), its errors, and whether it ended as Gemini ends a stream."""

    __slots__ = ("state", "started", "finished", "blocked", "calls")

    def __init__(self, state: StreamState) -> None:
        self.state = state
        self.started: set[int] = set()
        self.finished: set[int] = set()
        self.blocked = False
        self.calls = False

    def events(self, events: list[bytes]) -> tuple[bytes, StepFailed | None]:
        """The events to pass on, and the failure that ended them, if one did (what came before it still goes)."""
        out: list[bytes] = []
        for ev in events:
            d = event_data(ev)
            if d is None or not d.strip():
                continue
            try:
                obj = json.loads(d)
            except ValueError:
                return b"".join(out), QuotedFailure("Gemini sent a stream event that is not JSON", d)
            if not isinstance(obj, dict):
                return b"".join(out), StepFailed("Gemini sent a stream event that is not a JSON object")
            if obj.get("error"):
                return b"".join(out), error_from_gemini(None, obj, "Gemini stream error: ")
            self._read(obj)
            out.append(ev)
        return b"".join(out), None

    def _read(self, obj: dict[str, Any]) -> None:
        usage = usage_from_gemini(obj.get("usageMetadata"))
        if usage is not None:
            self.state.usage = usage
        feedback = obj.get("promptFeedback")
        if isinstance(feedback, dict) and feedback.get("blockReason"):
            self.blocked = True  # a blocked prompt ends the stream without candidates: a whole answer
            self.state.finish_reason = "content_filter"
        cands = obj.get("candidates")
        for pos, cand in enumerate(cands if isinstance(cands, list) else ()):
            if not isinstance(cand, dict):
                continue
            index = _int(cand.get("index"), pos)
            self.started.add(index)
            content = cand.get("content")
            parts = content.get("parts") if isinstance(content, dict) else None
            if isinstance(parts, list) and any(isinstance(p, dict) and "functionCall" in p for p in parts):
                self.calls = True
            reason = cand.get("finishReason")
            if isinstance(reason, str) and reason:
                self.finished.add(index)
                mapped = STOP_REASONS.get(reason) or ("content_filter" if reason in FILTER_REASONS
                                                      else reason.lower())
                self.state.finish_reason = "tool_calls" if mapped == "stop" and self.calls else mapped

    def close(self) -> None:
        """At the upstream's end: raises unless the stream ended as Gemini ends one."""
        if self.blocked:
            return
        if not self.finished:
            raise StepFailed("Gemini stream ended before its first chunk" if not self.started
                             else "Gemini stream ended before it was complete (no finishReason)")
        unfinished = self.started - self.finished
        if unfinished:
            raise StepFailed(f"Gemini stream ended before candidate {min(unfinished)} finished")


def _translate_events(tr: StreamTranslator, events: list[bytes]) -> tuple[bytes, StepFailed | None]:
    """The chunks for a batch of events, and the failure that ended it, if one did.

    What came before a failure is still delivered, so whether the client sees
    the text before an error does not depend on how TCP happened to split it.
    """
    out: list[bytes] = []
    for ev in events:
        d = event_data(ev)
        if d is None or not d.strip() or d == b"[DONE]":
            continue
        try:
            obj = json.loads(d)
        except ValueError:
            return b"".join(out), QuotedFailure("Gemini sent a stream event that is not JSON", d)
        try:
            out.extend(encode(c) for c in tr.feed(obj))
        except StepFailed as exc:
            return b"".join(out), exc
    return b"".join(out), None
