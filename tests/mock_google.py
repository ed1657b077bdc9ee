"""Mocks of Google's APIs on top of MockUpstream: the Gemini API (v1beta), Vertex AI (v1) and OAuth2.

:class:`GeminiMock` answers ``models/{m}:generateContent`` and
``:streamGenerateContent?alt=sse`` the way the real services do: JSON
``GenerateContentResponse`` objects, SSE events framed ``data: {...}\\r\\n\\r\\n``
with no ``[DONE]``, and errors as ``{"error": {"code", "message", "status"}}``.
With ``vertex=True`` it serves the Vertex paths
(``/v1/projects/{p}/locations/{l}/publishers/google/models/{m}:…``, express
mode's ``/v1/publishers/google/models/{m}:…`` and the OpenAI-compatible
``/v1/projects/{p}/locations/{l}/endpoints/openapi/chat/completions``) and
wants a bearer token the :class:`TokenServer` issued.

Every request is checked against the documented request schema, first with
the official ``google-genai`` SDK's own types (which forbid unknown fields),
then with the rules the service adds (roles, one datum per part, base64,
Gemini's Schema subset, as many function responses as calls, Gemini 3's
thought signatures). A request that breaks them gets the 400
``INVALID_ARGUMENT`` the real API sends, and the problems are kept in
:attr:`GeminiMock.problems` so tests can assert there were none. Everything
the mock sends is validated with the SDK's ``GenerateContentResponse`` too.

:class:`TokenServer` is Google's OAuth2 token endpoint and the metadata
server: it verifies a service account's JWT with the account's public key,
serves the refresh-token grant, and can hold its answers until a test
releases them.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from google.genai import types as gtypes
from pydantic import BaseModel, ValidationError

from tests.mock_upstream import MockUpstream, Received, Reply

API_KEY = "gemini-test-secret-key-123"
REQUEST_KEYS = {"contents", "systemInstruction", "tools", "toolConfig", "generationConfig", "safetySettings",
                "cachedContent", "labels"}
PART_DATA = ("text", "inlineData", "fileData", "functionCall", "functionResponse", "executableCode",
             "codeExecutionResult")
# Gemini's Schema object as the v1beta reference lists it (title/default/example are newer; we never send them).
SCHEMA_KEYS = {"type", "format", "description", "nullable", "enum", "maxItems", "minItems", "properties",
               "required", "minProperties", "maxProperties", "minLength", "maxLength", "pattern", "anyOf",
               "propertyOrdering", "items", "minimum", "maximum", "title", "default", "example"}
SCHEMA_TYPES = {"STRING", "NUMBER", "INTEGER", "BOOLEAN", "ARRAY", "OBJECT", "NULL"}
GEN_KEYS = {"stopSequences", "responseMimeType", "responseSchema", "candidateCount", "maxOutputTokens",
            "temperature", "topP", "topK", "seed", "presencePenalty", "frequencyPenalty", "responseLogprobs",
            "logprobs", "thinkingConfig", "responseModalities", "mediaResolution"}
FUNCTION_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:-]{0,63}$")
GEMINI_PATH = re.compile(r"^/v1beta/models/(?P<model>[^/:?]+):(?P<method>generateContent|streamGenerateContent)"
                         r"(?P<query>\?.*)?$")
VERTEX_PATH = re.compile(r"^/v1/(?:projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)/)?publishers/google/"
                         r"models/(?P<model>[^/:?]+):(?P<method>generateContent|streamGenerateContent)"
                         r"(?P<query>\?.*)?$")
VERTEX_OPENAI_PATH = re.compile(r"^/v1/projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)/endpoints/openapi/"
                                r"chat/completions$")
# models.countTokens: the Gemini API takes ``contents`` or a whole ``generateContentRequest``; Vertex takes the
# request's fields at the top level.
COUNT_PATH = re.compile(r"^/v1beta/models/(?P<model>[^/:?]+):countTokens$")
VERTEX_COUNT_PATH = re.compile(r"^/v1/(?:projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)/)?publishers/"
                               r"google/models/(?P<model>[^/:?]+):countTokens$")
VERTEX_COUNT_KEYS = {"contents", "systemInstruction", "tools", "generationConfig"}
STATUS_NAMES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE"}


def _validate(model: type[BaseModel], value: Any, where: str, p: list[str]) -> None:
    try:
        model.model_validate(value)
    except ValidationError as exc:
        for e in exc.errors()[:5]:
            p.append(f"{where}.{'.'.join(str(x) for x in e['loc'])}: {e['msg']}")


def _b64(value: Any, where: str, p: list[str], urlsafe: bool = False) -> None:
    if not isinstance(value, str) or not value:
        p.append(f"{where}: must be a non-empty base64 string")
        return
    try:
        if urlsafe:
            base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        else:
            base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        p.append(f"{where}: not valid base64")


# ---------------------------------------------------------------------------
# Request schema
# ---------------------------------------------------------------------------

def check_schema(s: Any, where: str, p: list[str]) -> None:
    """Gemini's Schema subset: the keywords it knows, upper-case types, string enums."""
    if not isinstance(s, dict):
        p.append(f"{where}: must be an object")
        return
    for k in sorted(set(s) - SCHEMA_KEYS):
        p.append(f"{where}.{k}: Invalid JSON payload received. Unknown name {k!r}")
    t = s.get("type")
    if t is not None and t not in SCHEMA_TYPES:
        p.append(f"{where}.type: must be one of {sorted(SCHEMA_TYPES)}")
    if "enum" in s:
        if t != "STRING" or not all(isinstance(v, str) for v in s["enum"]):
            p.append(f"{where}.enum: only for STRING, with string values")
    props = s.get("properties")
    if props is not None:
        if not isinstance(props, dict) or not props:
            p.append(f"{where}.properties: should be non-empty for OBJECT type")
        else:
            for k, v in props.items():
                check_schema(v, f"{where}.properties[{k}]", p)
    for r in s.get("required") or []:
        if not isinstance(props, dict) or r not in props:
            p.append(f"{where}.required[{r}]: property is not defined")
    if t == "ARRAY" and not isinstance(s.get("items"), dict):
        p.append(f"{where}.items: missing field (ARRAY needs items)")
    if isinstance(s.get("items"), dict):
        check_schema(s["items"], f"{where}.items", p)
    for i, sub in enumerate(s.get("anyOf") or []):
        check_schema(sub, f"{where}.anyOf[{i}]", p)


def _check_part(part: Any, where: str, role: str, vertex: bool, p: list[str]) -> None:
    if not isinstance(part, dict):
        p.append(f"{where}: must be an object")
        return
    data = [k for k in PART_DATA if k in part]
    if len(data) != 1:
        p.append(f"{where}: a part holds exactly one of {PART_DATA} (got {data})")
        return
    kind = data[0]
    if "thoughtSignature" in part:
        _b64(part["thoughtSignature"], f"{where}.thoughtSignature", p, urlsafe=True)
    if kind == "text" and (not isinstance(part["text"], str) or not part["text"]):
        p.append(f"{where}.text: Unable to submit request because it has an empty text parameter")
    elif kind == "inlineData":
        d = part["inlineData"]
        if not isinstance(d.get("mimeType"), str) or "/" not in d["mimeType"]:
            p.append(f"{where}.inlineData.mimeType: required")
        _b64(d.get("data"), f"{where}.inlineData.data", p)
    elif kind == "fileData":
        d = part["fileData"]
        if not isinstance(d.get("fileUri"), str) or "://" not in d["fileUri"]:
            p.append(f"{where}.fileData.fileUri: required URI")
        if vertex and not d.get("mimeType"):
            p.append(f"{where}.fileData.mimeType: required on Vertex")
    elif kind == "functionCall":
        fc = part["functionCall"]
        if role != "model":
            p.append(f"{where}: functionCall only in model turns")
        if not isinstance(fc.get("name"), str) or not FUNCTION_NAME_RE.match(fc["name"]):
            p.append(f"{where}.functionCall.name: invalid")
        if not isinstance(fc.get("args", {}), dict):
            p.append(f"{where}.functionCall.args: must be an object")
        if vertex and "id" in fc:
            p.append(f"{where}.functionCall.id: not sent to Vertex")
    elif kind == "functionResponse":
        fr = part["functionResponse"]
        if role != "user":
            p.append(f"{where}: functionResponse only in user turns")
        if not isinstance(fr.get("name"), str) or not FUNCTION_NAME_RE.match(fr["name"]):
            p.append(f"{where}.functionResponse.name: invalid")
        if not isinstance(fr.get("response"), dict):
            p.append(f"{where}.functionResponse.response: must be an object")
        if vertex and "id" in fr:
            p.append(f"{where}.functionResponse.id: not sent to Vertex")


def _check_contents(contents: Any, model: str, vertex: bool, p: list[str]) -> None:
    if not isinstance(contents, list) or not contents:
        p.append("contents: must not be empty")
        return
    last_calls: list[dict[str, Any]] = []
    signed_model = int(m.group(1)) >= 3 if (m := re.search(r"gemini-(\d+)", model)) else False
    for i, c in enumerate(contents):
        w = f"contents[{i}]"
        _validate(gtypes.Content, c, w, p)
        if not isinstance(c, dict):
            continue
        role = c.get("role")
        if role not in ("user", "model"):
            p.append(f"{w}.role: must be user or model")
        parts = c.get("parts")
        if not isinstance(parts, list) or not parts:
            p.append(f"{w}.parts: must not be empty")
            continue
        for j, part in enumerate(parts):
            _check_part(part, f"{w}.parts[{j}]", str(role), vertex, p)
        calls = [x["functionCall"] for x in parts if isinstance(x, dict) and "functionCall" in x]
        responses = [x["functionResponse"] for x in parts if isinstance(x, dict) and "functionResponse" in x]
        if calls:
            if signed_model and "thoughtSignature" not in parts[[k for k, x in enumerate(parts)
                                                                 if "functionCall" in x][0]]:
                p.append(f"{w}: Function call is missing a thought_signature in functionCall parts")
            last_calls = calls
        if responses:
            if len(responses) != len(last_calls):
                p.append(f"{w}: the number of function response parts must equal the number of function call "
                         f"parts of the function call turn ({len(responses)} != {len(last_calls)})")
            for r in responses:
                match = [c for c in last_calls if c.get("name") == r.get("name")
                         and ("id" not in r or c.get("id") == r["id"])]
                if not match:
                    p.append(f"{w}: functionResponse {r.get('name')}/{r.get('id')} matches no call of the "
                             "previous model turn")
            last_calls = []


def check_request(rec: Received, *, vertex: bool = False, api_key: str | None = API_KEY,
                  tokens: set[str] | None = None) -> tuple[list[str], dict[str, Any]]:
    """Every way the request breaks the documented API (empty when none), and what the path said."""
    p: list[str] = []
    info: dict[str, Any] = {}
    m = (VERTEX_PATH if vertex else GEMINI_PATH).match(rec.path)
    if rec.method != "POST" or not m:
        return [f"request line: no such method: {rec.method} {rec.path}"], info
    info = m.groupdict()
    query = parse_qs((info.get("query") or "?")[1:])
    if "key" in query:
        p.append("query: the API key must travel in x-goog-api-key, not the URL")
    if info["method"] == "streamGenerateContent" and query.get("alt") != ["sse"]:
        p.append("query: streamGenerateContent must be asked for alt=sse")
    if info["method"] == "generateContent" and query:
        p.append(f"query: unexpected {sorted(query)}")
    h = rec.headers
    if "application/json" not in h.get("content-type", ""):
        p.append("header content-type: must be application/json")
    express = vertex and not info.get("project")
    if vertex and not express:
        auth = h.get("authorization", "")
        if not auth.startswith("Bearer ") or tokens is None or auth[7:] not in tokens:
            info["unauthenticated"] = True
        if "x-goog-api-key" in h:
            p.append("header x-goog-api-key: not with OAuth")
    else:
        if h.get("x-goog-api-key") != api_key:
            info["bad_key"] = True
        if "authorization" in h:
            p.append("header authorization: the Gemini API takes x-goog-api-key")
    try:
        body = json.loads(rec.body)
    except ValueError:
        return [*p, "body: not JSON"], info
    if not isinstance(body, dict):
        return [*p, "body: not an object"], info
    for k in sorted(set(body) - REQUEST_KEYS):
        p.append(f"{k}: Invalid JSON payload received. Unknown name {k!r}")
    _check_contents(body.get("contents"), info["model"], vertex, p)
    si = body.get("systemInstruction")
    if si is not None:
        _validate(gtypes.Content, si, "systemInstruction", p)
        for j, part in enumerate(si.get("parts") or [] if isinstance(si, dict) else []):
            if set(part) != {"text"} or not part["text"]:
                p.append(f"systemInstruction.parts[{j}]: text parts only")
    for i, tool in enumerate(body.get("tools") or []):
        _validate(gtypes.Tool, tool, f"tools[{i}]", p)
        for j, decl in enumerate(tool.get("functionDeclarations") or []):
            w = f"tools[{i}].functionDeclarations[{j}]"
            if not isinstance(decl.get("name"), str) or not FUNCTION_NAME_RE.match(decl["name"]):
                p.append(f"{w}.name: invalid function name")
            if "parameters" in decl:
                check_schema(decl["parameters"], f"{w}.parameters", p)
                if decl["parameters"].get("type") != "OBJECT":
                    p.append(f"{w}.parameters.type: must be OBJECT")
    tc = body.get("toolConfig")
    if tc is not None:
        _validate(gtypes.ToolConfig, tc, "toolConfig", p)
        fcc = tc.get("functionCallingConfig") or {}
        if fcc.get("mode") not in ("AUTO", "ANY", "NONE", "VALIDATED"):
            p.append("toolConfig.functionCallingConfig.mode: invalid")
        if fcc.get("allowedFunctionNames") and fcc.get("mode") != "ANY":
            p.append("toolConfig.functionCallingConfig.allowedFunctionNames: only with mode ANY")
        if not body.get("tools"):
            p.append("toolConfig: without tools")
    gc = body.get("generationConfig")
    if gc is not None:
        _validate(gtypes.GenerationConfig, gc, "generationConfig", p)
        for k in sorted(set(gc) - GEN_KEYS):
            p.append(f"generationConfig.{k}: Unknown name")
        if "responseSchema" in gc:
            check_schema(gc["responseSchema"], "generationConfig.responseSchema", p)
            if gc.get("responseMimeType") != "application/json":
                p.append("generationConfig.responseSchema: needs responseMimeType application/json")
        if len(gc.get("stopSequences") or []) > 5:
            p.append("generationConfig.stopSequences: at most 5")
    for i, s in enumerate(body.get("safetySettings") or []):
        _validate(gtypes.SafetySetting, s, f"safetySettings[{i}]", p)
    info["body"] = body
    return p, info


def check_count_request(rec: Received, *, vertex: bool = False, api_key: str | None = API_KEY,
                        tokens: set[str] | None = None) -> tuple[list[str], dict[str, Any]]:
    """``models.countTokens`` as the documented API checks it (empty problems when none), and what the path said.

    The Gemini API (v1beta ``CountTokensRequest``) takes ``contents`` or ``generateContentRequest`` (whose
    ``model`` must be ``models/{model}``), never both; Vertex (v1) takes contents, systemInstruction, tools and
    generationConfig at the top level.
    """
    p: list[str] = []
    m = (VERTEX_COUNT_PATH if vertex else COUNT_PATH).match(rec.path)
    if rec.method != "POST" or not m:
        return [f"request line: no such method: {rec.method} {rec.path}"], {}
    info: dict[str, Any] = m.groupdict()
    h = rec.headers
    if "application/json" not in h.get("content-type", ""):
        p.append("header content-type: must be application/json")
    if vertex and info.get("project"):
        auth = h.get("authorization", "")
        if not auth.startswith("Bearer ") or tokens is None or auth[7:] not in tokens:
            info["unauthenticated"] = True
    elif h.get("x-goog-api-key") != api_key:
        info["bad_key"] = True
    try:
        body = json.loads(rec.body)
    except ValueError:
        return [*p, "body: not JSON"], info
    if not isinstance(body, dict):
        return [*p, "body: not an object"], info
    info["body"] = body
    if vertex:
        for k in sorted(set(body) - VERTEX_COUNT_KEYS):
            p.append(f"{k}: Invalid JSON payload received. Unknown name {k!r}")
        _check_contents(body.get("contents"), info["model"], vertex, p)
        return p, info
    for k in sorted(set(body) - {"contents", "generateContentRequest"}):
        p.append(f"{k}: Invalid JSON payload received. Unknown name {k!r}")
    inner = body.get("generateContentRequest")
    if ("contents" in body) == (inner is not None):
        p.append("countTokens takes either contents or generateContentRequest")
    if inner is not None:
        if not isinstance(inner, dict):
            return [*p, "generateContentRequest: must be an object"], info
        if inner.get("model") != f"models/{info['model']}":
            p.append(f"generateContentRequest.model: must be models/{info['model']}")
        for k in sorted(set(inner) - REQUEST_KEYS - {"model"}):
            p.append(f"generateContentRequest.{k}: Unknown name {k!r}")
        _check_contents(inner.get("contents"), info["model"], vertex, p)
    else:
        _check_contents(body.get("contents"), info["model"], vertex, p)
    return p, info


def count_answer(body: dict[str, Any], vertex: bool = False) -> dict[str, Any]:
    """A deterministic CountTokensResponse: one token per word of every text part sent."""
    inner = body.get("generateContentRequest")
    req: dict[str, Any] = inner if isinstance(inner, dict) else body
    words = chars = 0
    for c in [*(req.get("contents") or []), req.get("systemInstruction") or {}]:
        for part in (c.get("parts") or []) if isinstance(c, dict) else []:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                words += len(part["text"].split())
                chars += len(part["text"])
    out: dict[str, Any] = {"totalTokens": words}
    if vertex:
        out["totalBillableCharacters"] = chars
    gtypes.CountTokensResponse.model_validate({k: v for k, v in out.items() if k == "totalTokens"})
    return out


# ---------------------------------------------------------------------------
# What the service sends
# ---------------------------------------------------------------------------

def text(t: str, **extra: Any) -> dict[str, Any]:
    return {"text": t, **extra}


def thought(t: str) -> dict[str, Any]:
    return {"text": t, "thought": True}


def call(name: str, args: dict[str, Any], id: str | None = None, sig: str | None = None) -> dict[str, Any]:
    fc: dict[str, Any] = {"name": name, "args": args}
    if id:
        fc["id"] = id
    part: dict[str, Any] = {"functionCall": fc}
    if sig:
        part["thoughtSignature"] = sig
    return part


def usage(prompt: int = 10, out: int = 5, thoughts: int = 0, cached: int = 0) -> dict[str, Any]:
    u: dict[str, Any] = {"promptTokenCount": prompt, "candidatesTokenCount": out,
                         "totalTokenCount": prompt + out + thoughts}
    if thoughts:
        u["thoughtsTokenCount"] = thoughts
    if cached:
        u["cachedContentTokenCount"] = cached
    return u


def response(*parts: dict[str, Any], finish: str | None = "STOP", meta: dict[str, Any] | None = None,
             model: str = "gemini-2.5-flash", rid: str = "resp-abc", candidates: list[Any] | None = None,
             **extra: Any) -> dict[str, Any]:
    """A GenerateContentResponse (validated with the SDK's type)."""
    if candidates is None:
        cand: dict[str, Any] = {"index": 0}
        if parts:
            cand["content"] = {"role": "model", "parts": list(parts)}
        if finish is not None:
            cand["finishReason"] = finish
        candidates = [cand]
    obj: dict[str, Any] = {"candidates": candidates, "modelVersion": model, "responseId": rid, **extra}
    if meta is not None:
        obj["usageMetadata"] = meta
    gtypes.GenerateContentResponse.model_validate(obj)
    return obj


def google_error(status: int, message: str, name: str | None = None) -> dict[str, Any]:
    return {"error": {"code": status, "message": message, "status": name or STATUS_NAMES.get(status, "UNKNOWN")}}


def error_reply(status: int, message: str, name: str | None = None) -> Reply:
    return Reply(status=status, body=google_error(status, message, name))


def sse_event(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\r\n\r\n"


def sse(*objs: Any, **kw: Any) -> Reply:
    """An SSE stream the way Google frames it (CRLF, no [DONE]); bytes items go out verbatim."""
    for o in objs:
        if isinstance(o, dict) and "error" not in o:
            gtypes.GenerateContentResponse.model_validate(o)
    return Reply(sse=[o if isinstance(o, bytes) else sse_event(o) for o in objs], done=False, **kw)


# ---------------------------------------------------------------------------
# The service
# ---------------------------------------------------------------------------

@dataclass
class Call:
    received: Received
    info: dict[str, Any]

    @property
    def body(self) -> dict[str, Any]:
        return self.info.get("body") or {}

    @property
    def model(self) -> str:
        return str(self.info.get("model"))

    @property
    def stream(self) -> bool:
        return self.info.get("method") == "streamGenerateContent"


@dataclass
class GeminiMock:
    upstream: MockUpstream
    vertex: bool = False
    api_key: str | None = API_KEY
    tokens: set[str] = field(default_factory=set)  # bearer tokens Vertex accepts
    problems: list[str] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    openai_calls: list[Received] = field(default_factory=list)
    count_calls: list[Call] = field(default_factory=list)  # models.countTokens requests
    _queues: dict[str, list[Reply | Callable[[Call], Reply]]] = field(default_factory=dict)
    _count_queues: dict[str, list[Reply | Callable[[Call], Reply]]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.upstream.default = self._handle  # type: ignore[assignment]

    @property
    def url(self) -> str:
        return self.upstream.url

    def on(self, model: str, *replies: Reply | Callable[[Call], Reply]) -> None:
        """Answer the next requests for ``model`` with these replies in turn (the last one repeats)."""
        self._queues[model] = list(replies)

    def _next(self, model: str) -> Reply | Callable[[Call], Reply] | None:
        with self._lock:
            q = self._queues.get(model)
            if not q:
                return None
            return q.pop(0) if len(q) > 1 else q[0]

    def on_count(self, model: str, *replies: Reply | Callable[[Call], Reply]) -> None:
        """Answer the next countTokens requests for ``model`` with these (the last one repeats); without any,
        :func:`count_answer` answers."""
        self._count_queues[model] = list(replies)

    def _handle(self, rec: Received) -> Reply:
        if rec.path.endswith(":countTokens"):
            return self._count(rec)
        if self.vertex:
            m = VERTEX_OPENAI_PATH.match(rec.path)
            if m:
                return self._openai(rec)
        problems, info = check_request(rec, vertex=self.vertex, api_key=self.api_key, tokens=self.tokens)
        call_ = Call(rec, info)
        self.calls.append(call_)
        if info.get("unauthenticated"):
            return error_reply(401, "Request had invalid authentication credentials. Expected OAuth 2 access "
                                    "token, login cookie or other valid authentication credential.")
        if info.get("bad_key"):
            return error_reply(400, "API key not valid. Please pass a valid API key.")
        if problems:
            self.problems += problems
            return error_reply(400, "; ".join(problems))
        reply = self._next(str(info["model"]))
        if reply is None:
            return error_reply(404, f"models/{info['model']} is not found for API version v1beta")
        return reply(call_) if callable(reply) else reply

    def _count(self, rec: Received) -> Reply:
        problems, info = check_count_request(rec, vertex=self.vertex, api_key=self.api_key, tokens=self.tokens)
        call_ = Call(rec, info)
        self.count_calls.append(call_)
        if info.get("unauthenticated"):
            return error_reply(401, "Request had invalid authentication credentials.")
        if info.get("bad_key"):
            return error_reply(400, "API key not valid. Please pass a valid API key.")
        if problems:
            self.problems += problems
            return error_reply(400, "; ".join(problems))
        with self._lock:
            q = self._count_queues.get(str(info["model"]))
            reply = (q.pop(0) if len(q) > 1 else q[0]) if q else None
        if reply is None:
            return Reply(body=count_answer(call_.body, self.vertex))
        return reply(call_) if callable(reply) else reply

    def _openai(self, rec: Received) -> Reply:
        self.openai_calls.append(rec)
        auth = rec.headers.get("authorization", "")
        if not auth.startswith("Bearer ") or auth[7:] not in self.tokens:
            return Reply(status=401, body=[google_error(401, "Request had invalid authentication credentials.")])
        model = str(json.loads(rec.body).get("model"))
        reply = self._next(model)
        if reply is None:
            return Reply(status=404, body=[google_error(404, f"Publisher model {model} not found")])
        return reply(Call(rec, {"model": model})) if callable(reply) else reply


# ---------------------------------------------------------------------------
# OAuth2 and the metadata server
# ---------------------------------------------------------------------------

def _unb64(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def make_service_account(token_uri: str | None = None, project: str | None = "test-project") -> tuple[dict[str, Any],
                                                                                                     rsa.RSAPublicKey]:
    """A service-account key file's JSON, and the public key that checks its signatures."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    info: dict[str, Any] = {
        "type": "service_account", "private_key_id": "kid-0123456789", "private_key": pem,
        "client_email": "gateway@test-project.iam.gserviceaccount.com", "client_id": "1234567890",
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri or "https://oauth2.googleapis.com/token",
    }
    if project:
        info["project_id"] = project
    return info, key.public_key()


class TokenServer:
    """Google's token endpoint (JWT-bearer and refresh-token grants) and metadata server, on 127.0.0.1."""

    def __init__(self) -> None:
        self.public_keys: dict[str, rsa.RSAPublicKey] = {}  # client_email -> key
        self.refresh: dict[str, tuple[str, str]] = {}  # refresh_token -> (client_id, client_secret)
        self.issued: set[str] = set()
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        self.problems: list[str] = []
        self.expires_in = 3599
        self.project = "metadata-project"
        self.gate: threading.Event | None = None
        self.waiting = 0
        self._n = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                server._serve(self, b"")

            def do_POST(self) -> None:
                n = int(self.headers.get("content-length") or 0)
                server._serve(self, self.rfile.read(n) if n else b"")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        self.url = f"http://{self.host}/token"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def start(self) -> TokenServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        if self.gate is not None:
            self.gate.set()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)

    @property
    def token_requests(self) -> int:
        return len([r for r in self.requests if r[1].split("?")[0] in ("/token", "/computeMetadata/v1/instance/"
                                                                                 "service-accounts/default/token")])

    def _issue(self) -> dict[str, Any]:
        with self._lock:
            self._n += 1
            tok = f"ya29.mock-access-token-{self._n}"
            self.issued.add(tok)
        return {"access_token": tok, "expires_in": self.expires_in, "token_type": "Bearer"}

    def _serve(self, h: BaseHTTPRequestHandler, body: bytes) -> None:
        headers = {k.lower(): v for k, v in h.headers.items()}
        self.requests.append((h.command, h.path, headers, body))
        if self.gate is not None:
            with self._lock:
                self.waiting += 1
            self.gate.wait(10)
        path = urlsplit(h.path).path
        if path == "/token" and h.command == "POST":
            status, obj = self._token(headers, body)
        elif path.startswith("/computeMetadata/v1/") and h.command == "GET":
            if headers.get("metadata-flavor") != "Google":
                status, obj = 403, "Missing Metadata-Flavor:Google header."
            elif path == "/computeMetadata/v1/instance/service-accounts/default/token":
                status, obj = 200, self._issue()
            elif path == "/computeMetadata/v1/project/project-id":
                status, obj = 200, self.project
            else:
                status, obj = 404, "not found"
        else:
            status, obj = 404, "not found"
        data = obj.encode() if isinstance(obj, str) else json.dumps(obj).encode()
        h.send_response(status)
        h.send_header("content-type", "text/plain" if isinstance(obj, str) else "application/json")
        h.send_header("content-length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)
        h.wfile.flush()

    def _token(self, headers: dict[str, str], body: bytes) -> tuple[int, Any]:
        if headers.get("content-type") != "application/x-www-form-urlencoded":
            return 400, {"error": "invalid_request", "error_description": "form encoding required"}
        form = {k: v[0] for k, v in parse_qs(body.decode(), strict_parsing=True).items()}
        grant = form.get("grant_type")
        if grant == "urn:ietf:params:oauth:grant-type:jwt-bearer":
            problem = self._check_jwt(form.get("assertion", ""))
            if problem:
                self.problems.append(problem)
                return 400, {"error": "invalid_grant", "error_description": problem}
            return 200, self._issue()
        if grant == "refresh_token":
            known = self.refresh.get(form.get("refresh_token", ""))
            if known is None or known != (form.get("client_id"), form.get("client_secret")):
                return 400, {"error": "invalid_grant", "error_description": "Bad Request"}
            return 200, self._issue()
        return 400, {"error": "unsupported_grant_type", "error_description": f"Invalid grant_type: {grant}"}

    def _check_jwt(self, assertion: str) -> str | None:
        """Why the assertion is not acceptable, or None: signature, header and claims as Google checks them."""
        try:
            h64, c64, s64 = assertion.split(".")
            header, claims = json.loads(_unb64(h64)), json.loads(_unb64(c64))
            signature = _unb64(s64)
        except ValueError:
            return "Invalid JWT: malformed"
        if header.get("alg") != "RS256" or header.get("typ") != "JWT":
            return "Invalid JWT: alg must be RS256"
        key = self.public_keys.get(str(claims.get("iss")))
        if key is None:
            return "Invalid JWT: unknown issuer"
        try:
            key.verify(signature, f"{h64}.{c64}".encode(), padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            return "Invalid JWT Signature."
        if header.get("kid") != "kid-0123456789":
            return "Invalid JWT: kid does not name the key"
        if claims.get("aud") != self.url:
            return f"Invalid JWT: audience {claims.get('aud')!r} is not the token URL"
        if "https://www.googleapis.com/auth/cloud-platform" not in str(claims.get("scope", "")).split():
            return "Invalid JWT: scope must include cloud-platform"
        now = time.time()
        iat, exp = claims.get("iat"), claims.get("exp")
        if not isinstance(iat, int) or not isinstance(exp, int) or abs(iat - now) > 300:
            return "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe"
        if exp - iat > 3600 or exp <= iat:
            return "Invalid JWT: Token must be a short-lived token (60 minutes)"
        return None
