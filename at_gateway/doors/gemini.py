"""The Gemini door: ``POST /v1beta/models/{route}:generateContent``, ``:streamGenerateContent`` and ``:countTokens``
(also under ``/v1/models/`` and ``/models/``: current ``google-genai`` SDKs given only a base URL call ``v1``).

API followed: the Gemini API v1beta REST reference (``GenerateContentRequest``, ``Content``/``Part``, ``Tool``,
``ToolConfig``, ``GenerationConfig``, ``GenerateContentResponse``, ``UsageMetadata``, ``models.countTokens``), and
what the ``google-genai`` SDKs put on the wire. The route is the URL's model (``models/{route}``, percent-decoded);
the key comes as ``x-goog-api-key`` or ``?key=`` besides the gateway's usual two.

Native (``gemini`` and ``vertex`` steps, Vertex's OpenAI-compatible models excepted): the body goes as the client
sent it (thought signatures, safety settings, cached content, code execution: all kept) to the step's model; the
answer and the stream events come back unchanged, safety ratings included. A client key's system prompt and
``max_tokens`` cap apply to that body too, whichever spelling the client used (snake_case is folded into
camelCase first).

Translated (any other step): the request becomes an OpenAI chat body. Both spellings are read: camelCase and the
proto field names the REST API accepts too (``system_instruction``, ``function_declarations``,
``parameters_json_schema``, ``generation_config``, ``inline_data``, ``mime_type``, ...). What the chat form cannot
carry is dropped and named in the answer's ``x-gateway-warning`` header (``topK``, ``safetySettings``,
``cachedContent``, tools other than functions, thought parts of earlier turns); what the Gemini API itself would
refuse (no ``contents``, a part with no data or two, a role other than user/model, a number that is not one; a
number written as a string is one, as proto3 JSON has it) is a 400 ``INVALID_ARGUMENT`` naming the field. On a
route whose every step is native neither applies: nothing is dropped there, so nothing is warned about, and a
body the translation cannot carry goes to the upstream as sent (it is the judge; the limits then estimate from
the body's texts). A chat ``refusal`` comes back as the answer's text (Gemini has no refusal part), its
``finishReason`` the chat answer's (``content_filter``: SAFETY). Function calls keep an id across turns: the
upstream's, sent to the client as ``functionCall.id``; a history without ids gets ``call_{turn}_{part}`` (the same
on every turn, so prompt caches still match) and each ``functionResponse`` pairs with the previous model turn's
call of that name. Streamed calls come whole; fragments from upstreams that are not conformant (``index: null``,
a second call with its own id on one index) still make one call each, and names are never joined.

Streams: ``alt=sse`` gives ``data: {GenerateContentResponse}`` events, nothing else: Google's SDKs read only
``data:`` lines (the JavaScript ones hang on anything else), so the SSE comments routing sends while a step is slow
(keep-alives, the answering step's headers) never reach this door's clients. Without ``alt=sse`` the stream is
a JSON array of the same objects, as Gemini sends it. A stream that breaks ends with ``{"error": {...}}``, never
with a ``finishReason``.

Errors: ``{"error": {"code": status, "message", "status": "INVALID_ARGUMENT" | ..., "details": [ErrorInfo]}}``,
the gateway's own code as the ErrorInfo reason.
"""

from __future__ import annotations

import json
import math
import mimetypes
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_to_bytes

from ..config import Route, Step
from ..errors import BadRequest, GatewayError
from ..http.sse import event_data
from ..providers.base import Completion, Provider
from .base import Call, Door, StreamRenderer, dumps

if TYPE_CHECKING:
    from ..context import RequestContext
    from ..http.server import Request, Responder

GENERATE = "gemini.generate"
COUNT = "gemini.count_tokens"

STATUS_NAMES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                408: "DEADLINE_EXCEEDED", 409: "ABORTED", 429: "RESOURCE_EXHAUSTED", 499: "CANCELLED",
                500: "INTERNAL", 501: "UNIMPLEMENTED", 502: "UNAVAILABLE", 503: "UNAVAILABLE",
                504: "DEADLINE_EXCEEDED"}
FINISH = {"stop": "STOP", "tool_calls": "STOP", "function_call": "STOP", "length": "MAX_TOKENS",
          "content_filter": "SAFETY"}
# The data a Part holds (one each); the rest of a Part (thought, thoughtSignature, videoMetadata, ...) is metadata.
_DATA_KEYS = (("text", "text"), ("inlineData", "inline_data"), ("fileData", "file_data"),
              ("functionCall", "function_call"), ("functionResponse", "function_response"),
              ("executableCode", "executable_code"), ("codeExecutionResult", "code_execution_result"))
_TOOL_KINDS = ("functionDeclarations", "function_declarations")
_AUDIO_FORMATS = {"audio/wav": "wav", "audio/x-wav": "wav", "audio/wave": "wav", "audio/mp3": "mp3",
                  "audio/mpeg": "mp3"}
_LEVELS = {"minimal", "low", "medium", "high"}
_SCHEMA_NUMBERS = ("minItems", "maxItems", "minLength", "maxLength", "minProperties", "maxProperties", "minimum",
                   "maximum")
_IMAGE_TOKENS = 258  # what Gemini counts for an image (and per second of video): the estimate's unit for media
_SSE_END = b"\r\n\r\n"  # Google frames its events with CRLF
_TEXT_HEAD = b'{"content":{"role":"model","parts":[{"text":'
_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode  # built once (per call: slower)


def status_name(status: int) -> str:
    """The google.rpc.Code name Google's APIs pair with an HTTP status."""
    return STATUS_NAMES.get(status) or ("INVALID_ARGUMENT" if 400 <= status < 500 else "INTERNAL")


def google_error(status: int, message: str, code: str | None = None) -> dict[str, Any]:
    """An error in the shape of every Google API's; ``code`` (the gateway's own) travels as ErrorInfo.reason."""
    err: dict[str, Any] = {"code": status, "message": message, "status": status_name(status)}
    if code:
        err["details"] = [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": code,
                           "domain": "at-gateway"}]
    return {"error": err}


def invalid(message: str) -> BadRequest:
    return BadRequest(message, code="invalid_argument")


def _get(d: dict[str, Any], camel: str, snake: str) -> Any:
    """A field under either spelling (the REST API takes the proto names as well as camelCase)."""
    v = d.get(camel)
    return d.get(snake) if v is None else v


def _number(d: dict[str, Any], camel: str, snake: str, where: str) -> float | int | None:
    v = _get(d, camel, snake)
    if v is None:
        return None
    if isinstance(v, str):  # proto3 JSON takes a number as a string too ("0.5", "64"), and the API does
        v = _from_string(v)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise invalid(f"{where}.{camel} must be a number")
    return v


def _from_string(v: str) -> float | int | None:
    """A number written as a JSON string, as proto3 JSON allows; None when it is not a finite one."""
    try:
        return int(v)
    except ValueError:
        pass
    try:
        n = float(v)
    except ValueError:
        return None
    return n if math.isfinite(n) else None


def _fold(d: dict[str, Any], camel: str, snake: str) -> Any:
    """A field's value under either spelling (:func:`_get`), ``d`` left with the camelCase one only."""
    v = _get(d, camel, snake)
    d.pop(snake, None)
    d.pop(camel, None)
    if v is not None:
        d[camel] = v
    return v


def _whole(d: dict[str, Any], camel: str, snake: str, where: str) -> int | None:
    v = _number(d, camel, snake, where)
    if v is not None and v != int(v):
        raise invalid(f"{where}.{camel} must be a whole number")
    return None if v is None else int(v)


# --------------------------------------------------------------------------
# Gemini Schema -> JSON Schema
# --------------------------------------------------------------------------

def json_schema(s: Any, where: str = "schema") -> dict[str, Any]:
    """Gemini's OpenAPI-subset ``Schema`` (upper-case types, ``nullable``) as the JSON Schema chat tools take."""
    if not isinstance(s, dict):
        raise invalid(f"{where} must be a Schema object")
    out: dict[str, Any] = {}
    typ = s.get("type")
    if isinstance(typ, str) and typ.upper() not in ("TYPE_UNSPECIFIED", ""):
        out["type"] = typ.lower()
    for key in ("format", "description", "title", "pattern", "default"):
        if s.get(key) is not None:
            out[key] = s[key]
    for key in _SCHEMA_NUMBERS:
        v = s.get(key)
        if isinstance(v, str) and v.lstrip("-").isdigit():  # int64 fields arrive as strings in proto JSON
            v = int(v)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = v
    if isinstance(s.get("enum"), list):
        out["enum"] = list(s["enum"])
    props = s.get("properties")
    if isinstance(props, dict):
        out["properties"] = {k: json_schema(v, f"{where}.properties.{k}") for k, v in props.items()}
    if isinstance(s.get("required"), list):
        out["required"] = list(s["required"])
    if s.get("items") is not None:
        out["items"] = json_schema(s["items"], f"{where}.items")
    variants = _get(s, "anyOf", "any_of")
    if isinstance(variants, list):
        out["anyOf"] = [json_schema(v, f"{where}.anyOf[{i}]") for i, v in enumerate(variants)]
    if s.get("nullable") is True:
        if "anyOf" in out:
            out["anyOf"].append({"type": "null"})
        elif "type" in out:
            out["type"] = [out["type"], "null"]
            if "enum" in out:
                out["enum"].append(None)
    return out


# --------------------------------------------------------------------------
# Gemini request -> chat body
# --------------------------------------------------------------------------

class _Translation:
    """One request's translation: the chat body and the notes about what it left out."""

    def __init__(self) -> None:
        self.notes: list[str] = []
        self.include_thoughts = False

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def chat(self, body: dict[str, Any], model: str, stream: bool, token_field: str) -> dict[str, Any]:
        chat: dict[str, Any] = {"model": model}
        messages: list[dict[str, Any]] = []
        system = _get(body, "systemInstruction", "system_instruction")
        if system is not None:
            messages += [{"role": "system", "content": t} for t in self._system(system)]
        contents = body.get("contents")
        if not isinstance(contents, list) or not contents:
            raise invalid("contents must be a non-empty array of Content objects ({role, parts})")
        calls: list[list[Any]] = []  # the previous model turn's calls: [id, name, answered]
        for i, content in enumerate(contents):
            calls = self._content(content, f"contents[{i}]", i, calls, messages)
        if not any(m["role"] != "system" for m in messages):
            raise invalid("contents hold nothing a translated step can send (only thoughts or code execution)")
        chat["messages"] = messages
        tools = self._tools(body.get("tools"))
        if tools:
            chat["tools"] = tools
            choice = self._tool_choice(_get(body, "toolConfig", "tool_config"))
            if choice is not None:
                chat["tool_choice"] = choice
        elif _get(body, "toolConfig", "tool_config") is not None:
            self._tool_choice(_get(body, "toolConfig", "tool_config"))  # still checked
        gen = _get(body, "generationConfig", "generation_config")
        if gen is not None:
            self._generation(gen, chat, token_field)
        if _get(body, "safetySettings", "safety_settings"):
            self.note("safetySettings are not sent to translated steps")
        if _get(body, "cachedContent", "cached_content"):
            self.note("cachedContent is not sent to translated steps")
        if stream:
            chat["stream"] = True
            chat["stream_options"] = {"include_usage": True}
        return chat

    @staticmethod
    def _system(system: Any) -> list[str]:
        if isinstance(system, str):  # what the SDKs accept and expand; lenient here too
            return [system] if system else []
        if not isinstance(system, dict) or not isinstance(system.get("parts", []), list):
            raise invalid("systemInstruction must be a Content object ({parts: [{text}]})")
        out = []
        for j, part in enumerate(system.get("parts") or []):
            t = part.get("text") if isinstance(part, dict) else None
            if not isinstance(t, str):
                raise invalid(f"systemInstruction.parts[{j}] must be a text part")
            if t:
                out.append(t)
        return out

    def _content(self, content: Any, w: str, turn: int, calls: list[list[Any]],
                 messages: list[dict[str, Any]]) -> list[list[Any]]:
        if not isinstance(content, dict):
            raise invalid(f"{w} must be a Content object ({{role, parts}})")
        role = content.get("role") or "user"
        if role not in ("user", "model", "function"):  # "function": older clients' turn of function responses
            raise invalid(f"{w}.role must be 'user' or 'model', not {role!r}")
        parts = content.get("parts")
        if not isinstance(parts, list) or not parts:
            raise invalid(f"{w}.parts must be a non-empty array of Part objects")
        user: list[dict[str, Any]] = []
        texts: list[str] = []
        tool_calls: list[dict[str, Any]] = []
        made: list[list[Any]] = []
        for j, part in enumerate(parts):
            pw = f"{w}.parts[{j}]"
            if not isinstance(part, dict):
                raise invalid(f"{pw} must be a Part object")
            kinds = [camel for camel, snake in _DATA_KEYS if camel in part or snake in part]
            if len(kinds) > 1:
                raise invalid(f"{pw} holds {', '.join(kinds)}: a Part holds exactly one of them")
            if not kinds:
                if "thought" in part or "thoughtSignature" in part or "thought_signature" in part:
                    continue  # a signature-only part (streams end turns with them): nothing to translate
                raise invalid(f"{pw} holds no data: a Part holds one of text, inlineData, fileData, functionCall, "
                              "functionResponse, executableCode, codeExecutionResult")
            kind = kinds[0]
            value = _get(part, kind, dict(_DATA_KEYS)[kind])
            if kind == "text":
                if not isinstance(value, str):
                    raise invalid(f"{pw}.text must be a string")
                if part.get("thought") is True:
                    self.note("thought parts of earlier turns are not sent to translated steps")
                elif value and role == "model":
                    texts.append(value)
                elif value:
                    user.append({"type": "text", "text": value})
            elif kind in ("inlineData", "fileData"):
                media = self._media(kind, value, pw)
                if role == "model":
                    self.note("media in model turns is not sent to translated steps")
                else:
                    user.append(media)
            elif kind == "functionCall":
                if role != "model":
                    raise invalid(f"{pw}: a functionCall belongs in a model turn")
                tool_calls.append(self._call(value, pw, f"call_{turn}_{j}", made))
            elif kind == "functionResponse":
                if role == "model":
                    raise invalid(f"{pw}: a functionResponse belongs in a user turn")
                messages.append(self._response(value, pw, calls))
            else:
                self.note("code execution parts are not sent to translated steps")
        if role == "model":
            if texts or tool_calls:
                msg: dict[str, Any] = {"role": "assistant", "content": "".join(texts) or None}
                if tool_calls:
                    msg["tool_calls"] = tool_calls
                messages.append(msg)
            return made
        if user:
            only_text = len(user) == 1 and user[0]["type"] == "text"
            messages.append({"role": "user", "content": user[0]["text"] if only_text else user})
        return calls

    @staticmethod
    def _media(kind: str, value: Any, pw: str) -> dict[str, Any]:
        if kind == "inlineData":
            if not isinstance(value, dict):
                raise invalid(f"{pw}.inlineData must be a Blob object ({{mimeType, data}})")
            mime, data = _get(value, "mimeType", "mime_type"), value.get("data")
            if not isinstance(mime, str) or "/" not in mime:
                raise invalid(f"{pw}.inlineData.mimeType must be a MIME type")
            if not isinstance(data, str) or not data:
                raise invalid(f"{pw}.inlineData.data must be base64 data")
            mime = mime.lower()
            if mime.startswith("image/"):
                return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}}
            if mime.startswith("audio/"):
                return {"type": "input_audio", "input_audio": {"data": data, "format": _AUDIO_FORMATS.get(
                    mime, mime.split("/", 1)[1])}}
            ext = mimetypes.guess_extension(mime) or ".bin"
            return {"type": "file", "file": {"filename": "file" + ext, "file_data": f"data:{mime};base64,{data}"}}
        if not isinstance(value, dict):
            raise invalid(f"{pw}.fileData must be a FileData object ({{mimeType, fileUri}})")
        uri = _get(value, "fileUri", "file_uri")
        if not isinstance(uri, str) or not uri:
            raise invalid(f"{pw}.fileData.fileUri must be a URI")
        mime = _get(value, "mimeType", "mime_type")
        if not isinstance(mime, str) or not mime:
            mime = mimetypes.guess_type(uri.split("?", 1)[0])[0] or ""
        if mime.lower().startswith("image/"):
            return {"type": "image_url", "image_url": {"url": uri}}
        # Not an image: only the upstream can say whether it reads the URI (a refusal falls through).
        return {"type": "file", "file": {"file_id": uri}}

    @staticmethod
    def _call(fc: Any, pw: str, minted: str, made: list[list[Any]]) -> dict[str, Any]:
        if not isinstance(fc, dict) or not isinstance(fc.get("name"), str) or not fc["name"]:
            raise invalid(f"{pw}.functionCall.name is required")
        args = fc.get("args")
        if args is None:
            args = {}
        if not isinstance(args, dict):
            raise invalid(f"{pw}.functionCall.args must be an object")
        call_id = fc.get("id") if isinstance(fc.get("id"), str) and fc.get("id") else minted
        made.append([call_id, fc["name"], False])
        return {"id": call_id, "type": "function",
                "function": {"name": fc["name"], "arguments": json.dumps(args, separators=(",", ":"),
                                                                         ensure_ascii=False)}}

    @staticmethod
    def _response(fr: Any, pw: str, calls: list[list[Any]]) -> dict[str, Any]:
        if not isinstance(fr, dict) or not isinstance(fr.get("name"), str) or not fr["name"]:
            raise invalid(f"{pw}.functionResponse.name is required")
        result = fr.get("response")
        if result is None:
            result = {}
        if not isinstance(result, dict):
            raise invalid(f"{pw}.functionResponse.response must be an object")
        want = fr.get("id") if isinstance(fr.get("id"), str) and fr.get("id") else None
        match = next((c for c in calls if not c[2] and c[0] == want), None) if want else None
        if match is None:
            match = next((c for c in calls if not c[2] and c[1] == fr["name"]), None)
        if match is None:
            raise invalid(f"{pw}: the functionResponse {fr['name']!r} answers no functionCall of the previous "
                          "model turn")
        match[2] = True
        return {"role": "tool", "tool_call_id": match[0],
                "content": json.dumps(result, separators=(",", ":"), ensure_ascii=False)}

    def _tools(self, tools: Any) -> list[dict[str, Any]]:
        if tools is None:
            return []
        if not isinstance(tools, list):
            raise invalid("tools must be an array of Tool objects")
        out: list[dict[str, Any]] = []
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict):
                raise invalid(f"tools[{i}] must be a Tool object")
            for key in tool:
                if key not in _TOOL_KINDS:
                    self.note(f"tool {key} is not sent to translated steps (they run functions only)")
            decls = _get(tool, *_TOOL_KINDS)
            if decls is None:
                continue
            if not isinstance(decls, list):
                raise invalid(f"tools[{i}].functionDeclarations must be an array")
            for j, d in enumerate(decls):
                dw = f"tools[{i}].functionDeclarations[{j}]"
                if not isinstance(d, dict) or not isinstance(d.get("name"), str) or not d["name"]:
                    raise invalid(f"{dw}.name is required")
                fn: dict[str, Any] = {"name": d["name"]}
                if isinstance(d.get("description"), str) and d["description"]:
                    fn["description"] = d["description"]
                raw = _get(d, "parametersJsonSchema", "parameters_json_schema")
                if raw is not None:
                    if not isinstance(raw, dict):
                        raise invalid(f"{dw}.parametersJsonSchema must be a JSON Schema object")
                    fn["parameters"] = raw
                elif d.get("parameters") is not None:
                    fn["parameters"] = json_schema(d["parameters"], f"{dw}.parameters")
                out.append({"type": "function", "function": fn})
        return out

    def _tool_choice(self, config: Any) -> Any:
        if config is None:
            return None
        if not isinstance(config, dict):
            raise invalid("toolConfig must be an object")
        fcc = _get(config, "functionCallingConfig", "function_calling_config")
        if fcc is None:
            return None
        if not isinstance(fcc, dict):
            raise invalid("toolConfig.functionCallingConfig must be an object")
        mode = fcc.get("mode") or "MODE_UNSPECIFIED"
        names = _get(fcc, "allowedFunctionNames", "allowed_function_names") or []
        if not isinstance(mode, str) or mode.upper() not in ("AUTO", "ANY", "NONE", "VALIDATED", "MODE_UNSPECIFIED"):
            raise invalid(f"toolConfig.functionCallingConfig.mode must be AUTO, ANY, NONE or VALIDATED, not {mode!r}")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise invalid("toolConfig.functionCallingConfig.allowedFunctionNames must be an array of names")
        mode = mode.upper()
        if mode == "ANY":
            if len(names) == 1:
                return {"type": "function", "function": {"name": names[0]}}
            if names:
                self.note("allowedFunctionNames of more than one function is sent as 'any function'")
            return "required"
        if names:
            self.note("allowedFunctionNames without mode ANY is not sent to translated steps")
        return {"AUTO": "auto", "VALIDATED": "auto", "NONE": "none"}.get(mode)

    def _generation(self, gen: Any, chat: dict[str, Any], token_field: str) -> None:
        w = "generationConfig"
        if not isinstance(gen, dict):
            raise invalid(f"{w} must be an object")
        for camel, snake, dst in (("temperature", "temperature", "temperature"), ("topP", "top_p", "top_p"),
                                  ("presencePenalty", "presence_penalty", "presence_penalty"),
                                  ("frequencyPenalty", "frequency_penalty", "frequency_penalty")):
            v = _number(gen, camel, snake, w)
            if v is not None:
                chat[dst] = v
        for camel, snake, dst in (("maxOutputTokens", "max_output_tokens", token_field), ("seed", "seed", "seed")):
            n = _whole(gen, camel, snake, w)
            if n is not None:
                chat[dst] = n
        count = _whole(gen, "candidateCount", "candidate_count", w)
        if count is not None and count != 1:
            chat["n"] = count
        if _number(gen, "topK", "top_k", w) is not None:
            self.note("topK is not sent to translated steps")
        stops = _get(gen, "stopSequences", "stop_sequences")
        if stops is not None:
            if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
                raise invalid(f"{w}.stopSequences must be an array of strings")
            if stops:
                chat["stop"] = stops
        if _get(gen, "responseLogprobs", "response_logprobs") or _get(gen, "logprobs", "logprobs") is not None:
            self.note("logprobs are not sent to translated steps")
        modalities = _get(gen, "responseModalities", "response_modalities")
        if isinstance(modalities, list) and any(str(m).upper() != "TEXT" for m in modalities):
            self.note("responseModalities other than TEXT are not sent to translated steps")
        self._format(gen, chat)
        thinking = _get(gen, "thinkingConfig", "thinking_config")
        if thinking is not None:
            if not isinstance(thinking, dict):
                raise invalid(f"{w}.thinkingConfig must be an object")
            self.include_thoughts = _get(thinking, "includeThoughts", "include_thoughts") is True
            level = _get(thinking, "thinkingLevel", "thinking_level")
            budget = _whole(thinking, "thinkingBudget", "thinking_budget", f"{w}.thinkingConfig")
            if isinstance(level, str) and level.lower() in _LEVELS:
                chat["reasoning_effort"] = level.lower()
            elif budget is not None and budget >= 0:  # -1: dynamic, the model's own choice
                chat["reasoning_effort"] = ("none" if budget == 0 else "minimal" if budget <= 512 else
                                            "low" if budget <= 1024 else "medium" if budget <= 8192 else "high")

    def _format(self, gen: dict[str, Any], chat: dict[str, Any]) -> None:
        mime = _get(gen, "responseMimeType", "response_mime_type")
        raw = _get(gen, "responseJsonSchema", "response_json_schema")
        if raw is None:
            raw = gen.get("_responseJsonSchema")
        schema = _get(gen, "responseSchema", "response_schema")
        if mime in (None, "", "text/plain"):
            if raw is not None or schema is not None:
                raise invalid("generationConfig.responseSchema needs responseMimeType application/json")
            return
        if mime != "application/json":
            self.note(f"responseMimeType {mime} is not sent to translated steps")
            return
        if raw is not None:
            if not isinstance(raw, dict):
                raise invalid("generationConfig.responseJsonSchema must be a JSON Schema object")
            chat["response_format"] = {"type": "json_schema", "json_schema": {"name": "response", "schema": raw}}
        elif schema is not None:
            chat["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "response", "schema": json_schema(schema, "generationConfig.responseSchema")}}
        else:
            chat["response_format"] = {"type": "json_object"}


# --------------------------------------------------------------------------
# chat completion -> Gemini answer
# --------------------------------------------------------------------------

def usage_metadata(usage: Any) -> dict[str, Any] | None:
    """OpenAI usage as Gemini's: reasoning tokens are ``thoughtsTokenCount``, apart from the candidates'."""
    if not isinstance(usage, dict):
        return None

    def n(v: Any) -> int:
        return v if isinstance(v, int) and not isinstance(v, bool) else 0

    prompt, completion = n(usage.get("prompt_tokens")), n(usage.get("completion_tokens"))
    details = usage.get("completion_tokens_details")
    thoughts = n(details.get("reasoning_tokens")) if isinstance(details, dict) else 0
    cached_details = usage.get("prompt_tokens_details")
    cached = n(cached_details.get("cached_tokens")) if isinstance(cached_details, dict) else 0
    out = {"promptTokenCount": prompt, "candidatesTokenCount": max(0, completion - thoughts),
           "totalTokenCount": n(usage.get("total_tokens")) or prompt + completion}
    if thoughts:
        out["thoughtsTokenCount"] = thoughts
    if cached:
        out["cachedContentTokenCount"] = cached
    return out


def _function_call(call_id: Any, name: Any, arguments: Any) -> dict[str, Any]:
    args: Any
    if isinstance(arguments, dict):
        args = arguments
    else:
        try:
            args = json.loads(arguments) if arguments else {}
        except (TypeError, ValueError):
            args = None
        if not isinstance(args, dict):
            args = {"arguments": arguments}  # not an object: kept whole rather than lost
    fc: dict[str, Any] = {"name": str(name or ""), "args": args}
    if isinstance(call_id, str) and call_id:
        fc["id"] = call_id
    return {"functionCall": fc}


def _candidate(index: int, parts: list[dict[str, Any]], finish: str | None) -> dict[str, Any]:
    # A turn with no parts reads as Gemini sends it (content without parts): a client that keeps the turn in
    # its history does not send back an empty part, which Gemini refuses.
    cand: dict[str, Any] = {"content": {"role": "model", "parts": parts} if parts else {"role": "model"}}
    if finish is not None:
        cand["finishReason"] = FINISH.get(finish, "OTHER")
    cand["index"] = index
    return cand


class _Frames:
    """How one stream's objects go on the wire: SSE ``data:`` events, or the items of one JSON array."""

    __slots__ = ("array", "started")

    def __init__(self, array: bool) -> None:
        self.array = array
        self.started = False

    def item(self, data: bytes) -> bytes:
        if not self.array:
            return b"data: " + data + _SSE_END
        sep = b",\r\n" if self.started else b"["
        self.started = True
        return sep + data

    def end(self) -> bytes:
        return (b"]" if self.started else b"[]") if self.array else b""

    def error(self, error: dict[str, Any]) -> bytes:
        got = error.get("error")
        err: dict[str, Any] = got if isinstance(got, dict) else {}
        status = err["status"] if isinstance(err.get("status"), int) else 502
        code = err["code"] if isinstance(err.get("code"), str) else None
        out = self.item(dumps(google_error(status, str(err.get("message") or "stream failed"), code)))
        return out + (b"]" if self.array else b"")


class _NativeRenderer(StreamRenderer):
    """A gemini/vertex step's own events: passed on unchanged (as SSE), or re-framed as a JSON array."""

    __slots__ = ("frames",)

    def __init__(self, array: bool) -> None:
        self.frames = _Frames(array)

    def feed(self, chunk: bytes) -> bytes:
        if not self.frames.array:
            return chunk
        out = []
        for ev in chunk.split(b"\n\n"):
            d = event_data(ev + b"\n\n") if ev.strip() else None
            if d:
                out.append(self.frames.item(d))
        return b"".join(out)

    def close(self) -> bytes:
        return self.frames.end()

    def fail(self, error: dict[str, Any]) -> bytes:
        return self.frames.error(error)


def _another_call(kept: list[Any], call_id: str, name: str) -> bool:
    """Whether a fragment (its id and name, "" when absent) is another call than ``kept`` ([id, name, args]):
    another id (ids decide when both have one), else another name."""
    if call_id and kept[0]:
        return bool(call_id != kept[0])
    return bool(name and kept[1] and name != kept[1])


class _ChatRenderer(StreamRenderer):
    """OpenAI chat chunks in, Gemini stream objects out, one per chunk that carries text.

    A text chunk costs one ``json.loads`` and one ``json.dumps`` of its text: the rest of the object is built
    once per stream. Function calls stream in fragments from OpenAI but whole from Gemini, so they are kept and
    sent with the last object, which carries the finishReason and usageMetadata (Gemini ends a stream so).
    """

    def __init__(self, call: GeminiCall, step: Step | None) -> None:
        self.frames = _Frames(call.array)
        self.thoughts = call.include_thoughts
        self.model = step.model if step is not None else call.model
        self.rid = ""
        self.tail = b""
        # choice -> its tool calls as they came, each [id, name, arguments]; and each chat index's current call
        self.calls: dict[int, list[list[Any]]] = {}
        self.slots: dict[int, dict[int, list[Any]]] = {}
        self.last_slot: dict[int, int] = {}  # choice -> the chat index of its last fragment
        self.finish: dict[int, str] = {}
        self.seen: set[int] = set()
        self.usage: Any = None

    def _begin(self, obj: dict[str, Any]) -> None:
        if isinstance(obj.get("model"), str) and obj["model"]:
            self.model = obj["model"]
        self.rid = str(obj.get("id") or "resp-" + format(time.time_ns(), "x"))
        self.tail = b',"modelVersion":' + dumps(self.model) + b',"responseId":' + dumps(self.rid) + b"}"

    def feed(self, chunk: bytes) -> bytes:
        out: list[bytes] = []
        for ev in chunk.split(b"\n\n"):
            if not ev.startswith(b"data: "):
                continue
            obj = json.loads(ev[6:])
            if not self.tail:
                self._begin(obj)
            if obj.get("usage"):
                self.usage = obj["usage"]
            cands: list[bytes] = []
            for choice in obj.get("choices") or ():
                index = choice.get("index") or 0
                self.seen.add(index)
                delta = choice.get("delta") or {}
                parts: list[dict[str, Any]] = []
                reasoning = delta.get("reasoning_content") or delta.get("reasoning")
                if reasoning and self.thoughts and isinstance(reasoning, str):
                    parts.append({"text": reasoning, "thought": True})
                if delta.get("content"):
                    parts.append({"text": delta["content"]})
                refusal = delta.get("refusal")
                if refusal and isinstance(refusal, str):  # Gemini has no refusal part: the text
                    parts.append({"text": refusal})
                tool_calls = delta.get("tool_calls")
                if tool_calls:
                    self._tool_calls(index, tool_calls)
                if choice.get("finish_reason"):
                    self.finish[index] = choice["finish_reason"]
                if len(parts) == 1 and len(parts[0]) == 1:  # the common chunk, one text: only its string encoded
                    cands.append(_TEXT_HEAD + _encode(parts[0]["text"]).encode() + b'}]},"index":%d}' % index)
                elif parts:
                    cands.append(_encode(_candidate(index, parts, None)).encode())
            if cands:
                out.append(self.frames.item(b'{"candidates":[' + b",".join(cands) + b"]" + self.tail))
        return b"".join(out)

    def _tool_calls(self, choice: int, fragments: Any) -> None:
        """Keep one chunk's tool-call fragments. Upstreams that are not conformant send ``index: null`` (the
        last call's index when the fragment may be its rest, else the next free one) or a second call on an
        index, with its own id (or name): a new call. A name is never joined to another."""
        slots = self.slots.setdefault(choice, {})
        for tc in fragments if isinstance(fragments, list) else ():
            if not isinstance(tc, dict):
                continue
            fn: dict[str, Any] = tc["function"] if isinstance(tc.get("function"), dict) else {}
            call_id = tc["id"] if isinstance(tc.get("id"), str) else ""
            name = fn["name"] if isinstance(fn.get("name"), str) else ""
            at = tc.get("index", 0)
            if at is None:
                last = self.last_slot.get(choice)
                at = last if last in slots and not _another_call(slots[last], call_id, name) \
                    else max(slots, default=-1) + 1
            elif not isinstance(at, int) or isinstance(at, bool):
                continue
            self.last_slot[choice] = at
            kept = slots.get(at)
            if kept is None or _another_call(kept, call_id, name):
                kept = slots[at] = [None, "", ""]
                self.calls.setdefault(choice, []).append(kept)
            if call_id and not kept[0]:
                kept[0] = call_id
            if name and not kept[1]:
                kept[1] = name
            if isinstance(fn.get("arguments"), str):
                kept[2] += fn["arguments"]

    def close(self) -> bytes:
        if not self.tail:
            self._begin({})
        cands = []
        for index in sorted(self.seen | set(self.finish) | set(self.calls) or {0}):
            parts = [_function_call(*c) for c in self.calls.get(index, ())]
            cands.append(_candidate(index, parts, self.finish.get(index, "stop")))
        obj: dict[str, Any] = {"candidates": cands}
        meta = usage_metadata(self.usage)
        if meta is not None:
            obj["usageMetadata"] = meta
        data = dumps(obj)[:-1] + self.tail
        return self.frames.item(data) + self.frames.end()

    def fail(self, error: dict[str, Any]) -> bytes:
        return self.frames.error(error)


# --------------------------------------------------------------------------
# The door
# --------------------------------------------------------------------------

_ARRAY_HEADERS = [(b"content-type", b"application/json"), (b"cache-control", b"no-cache"),
                  (b"x-accel-buffering", b"no")]


class GeminiCall(Call):
    """A Gemini request: ``array`` (a stream asked for without ``alt=sse``), ``include_thoughts``."""

    def __init__(self, door: Door, model: str, chat: dict[str, Any], native: dict[str, Any], *, stream: bool,
                 array: bool = False, include_thoughts: bool = False) -> None:
        super().__init__(door, model, chat, native=native, stream=stream)
        self.array = array
        self.include_thoughts = include_thoughts
        if array:  # streamed without alt=sse: one JSON array, written as it grows
            self.stream_headers = _ARRAY_HEADERS

    comments = False  # Google's SDKs read nothing but data: lines (no keep-alives, no step comments)

    def native_body(self, step: Step) -> dict[str, Any]:
        """The body as sent; the model is the URL's (a ``model`` field would name the route, not the step's)."""
        body = dict(self.native or {})
        body.pop("model", None)
        return body


class _CountCall(GeminiCall):
    """countTokens: each (native) step asked to count."""

    async def complete(self, adapter: Provider, prepared: dict[str, Any], step: Step) -> Completion:
        return await adapter.send_native(COUNT, self.native_body(step), step, self.headers)


def _stand_in(body: dict[str, Any], model: str, stream: bool, token_field: str) -> dict[str, Any]:
    """The chat body of a request the translation cannot carry, on a route of native steps only: what limits
    estimate from (the texts) and a key's cap reads (``maxOutputTokens``). No step is sent it."""
    texts: list[str] = []

    def walk(content: Any) -> None:
        parts = content.get("parts") if isinstance(content, dict) else None
        for part in parts if isinstance(parts, list) else ():
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                texts.append(part["text"])

    system = _get(body, "systemInstruction", "system_instruction")
    if isinstance(system, str):
        texts.append(system)
    else:
        walk(system)
    contents = body.get("contents")
    for content in contents if isinstance(contents, list) else ():
        walk(content)
    chat: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "\n".join(texts)}]}
    gen = _get(body, "generationConfig", "generation_config")
    if isinstance(gen, dict):
        n = _get(gen, "maxOutputTokens", "max_output_tokens")
        n = _from_string(n) if isinstance(n, str) else n
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            chat[token_field] = n
    if stream:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    return chat


def route_from_path(path: bytes) -> str:
    """``/v1beta/models/{route}:method`` -> the route, percent-decoded (a route may hold ``/`` and ``:``)."""
    start = path.find(b"models/") + len(b"models/")
    return unquote_to_bytes(path[start:path.rindex(b":")]).decode("utf-8", "replace")


def estimate_tokens(body: dict[str, Any]) -> int:
    """A conservative count, for a route without a step that counts: per text the larger of a token per three
    UTF-8 bytes (English runs about four characters a token, CJK about one) and a token per word, Gemini's
    258 per image or file, and a few per turn. Meant to be at or above what a tokenizer says."""
    inner = _get(body, "generateContentRequest", "generate_content_request")
    req = inner if isinstance(inner, dict) else body
    total = 0

    def text(s: str) -> int:
        return max(math.ceil(len(s.encode()) / 3), len(s.split()))

    found = req.get("contents")
    contents: list[Any] = found if isinstance(found, list) else []
    system = _get(req, "systemInstruction", "system_instruction")
    if isinstance(system, str):
        total += text(system)
    elif isinstance(system, dict):
        contents = [*contents, system]
    for content in contents:
        if not isinstance(content, dict):
            continue
        total += 4
        parts = content.get("parts")
        for part in parts if isinstance(parts, list) else ():
            if not isinstance(part, dict):
                continue
            if isinstance(part.get("text"), str):
                total += text(part["text"])
            elif any(k in part for k in ("inlineData", "inline_data", "fileData", "file_data")):
                total += _IMAGE_TOKENS
            else:
                total += text(json.dumps(part, ensure_ascii=False))
    if req.get("tools"):
        total += text(json.dumps(req["tools"], ensure_ascii=False))
    return total


class GeminiDoor(Door):
    name = "gemini"
    native_op = GENERATE
    model_in_body = False  # the route comes from the URL
    google_keys = True

    def build_call(self, model: str, body: dict[str, Any], *, stream: bool, array: bool = False,
                   token_field: str = "max_tokens", native_only: bool = False) -> GeminiCall:
        """The Call for a Gemini body: its chat translation (400 for what Gemini would refuse) and the body.

        ``native_only``: every step of the route takes the body as sent, so what the translation cannot carry
        is no reason to refuse it (the upstream judges the body) and nothing it drops is worth a warning; a
        body it cannot translate gets a stand-in chat body, which only limits and a key's rules read."""
        tr = _Translation()
        try:
            chat = tr.chat(body, model, stream, token_field)
        except BadRequest:
            if not native_only:
                raise
            chat = _stand_in(body, model, stream, token_field)
        call = GeminiCall(self, model, chat, body, stream=stream, array=array, include_thoughts=tr.include_thoughts)
        call.notes = [] if native_only else tr.notes
        return call

    def parse(self, request: Request, decode: Any, token_field: str = "max_tokens",
              native_only: bool = False) -> Call:
        body = decode(request.body)
        if not isinstance(body, dict):
            raise invalid("the request body must be a JSON object (a GenerateContentRequest)")
        path = request.path
        stream = path.endswith(b":streamGenerateContent")
        array = stream and b"alt=sse" not in request.query.split(b"&")
        return self.build_call(route_from_path(path), body, stream=stream, array=array, token_field=token_field,
                               native_only=native_only)

    @staticmethod
    def native_only(gateway: Any, model: str) -> bool:
        """Whether every step of the route ``model`` names takes Gemini's body as sent (gemini, vertex)."""
        route = gateway.config.routes.get(model)
        providers = gateway.providers
        return route is not None and all(s.provider in providers and providers[s.provider].native(GENERATE, s)
                                         for s in route.steps)

    def render(self, call: Call, done: Completion, step: Step) -> bytes:
        obj = json.loads(done.body)
        thoughts = isinstance(call, GeminiCall) and call.include_thoughts
        cands = []
        for pos, choice in enumerate(obj.get("choices") or ()):
            msg = choice.get("message") or {}
            parts: list[dict[str, Any]] = []
            reasoning = msg.get("reasoning_content") or msg.get("reasoning")
            if thoughts and isinstance(reasoning, str) and reasoning:
                parts.append({"text": reasoning, "thought": True})
            if isinstance(msg.get("content"), str) and msg["content"]:
                parts.append({"text": msg["content"]})
            if isinstance(msg.get("refusal"), str) and msg["refusal"]:  # Gemini has no refusal part: the text
                parts.append({"text": msg["refusal"]})
            for tc in msg.get("tool_calls") or ():
                fn = tc.get("function") or {}
                parts.append(_function_call(tc.get("id"), fn.get("name"), fn.get("arguments")))
            cands.append(_candidate(choice.get("index", pos), parts, choice.get("finish_reason") or "stop"))
        out: dict[str, Any] = {"candidates": cands}
        meta = usage_metadata(obj.get("usage") or done.usage)
        if meta is not None:
            out["usageMetadata"] = meta
        out["modelVersion"] = obj.get("model") or step.model
        out["responseId"] = str(obj.get("id") or "")
        return dumps(out)

    def renderer(self, call: Call, step: Step | None, native: bool) -> StreamRenderer:
        array = isinstance(call, GeminiCall) and call.array
        if native:
            return _NativeRenderer(array)
        assert isinstance(call, GeminiCall)
        return _ChatRenderer(call, step)

    def error_body(self, exc: GatewayError) -> tuple[int, bytes]:
        return exc.status, dumps(google_error(exc.status, exc.message, exc.code))

    def constrain(self, call: Call, system_prompt: str | None, max_tokens: int | None) -> None:
        """The key's system prompt as the first part of ``systemInstruction``; its cap on ``maxOutputTokens``.
        The REST API reads both spellings of a field, so the snake_case ones are folded into camelCase first
        (the camelCase value when it is set, as the translation reads them): no spelling is left for the
        upstream to read unconstrained."""
        body = dict(call.native or {})
        if system_prompt:
            mine = _fold(body, "systemInstruction", "system_instruction")
            first = [{"text": system_prompt}]
            if isinstance(mine, dict):
                parts = mine.get("parts")
                body["systemInstruction"] = {**mine, "parts": first + (parts if isinstance(parts, list) else [])}
            elif isinstance(mine, str) and mine:
                body["systemInstruction"] = {"parts": first + [{"text": mine}]}
            else:
                body["systemInstruction"] = {"parts": first}
        if max_tokens is not None:
            gen = _fold(body, "generationConfig", "generation_config")
            if gen is None or isinstance(gen, dict):  # anything else: the API refuses the request, cap or not
                gen = dict(gen or {})
                sent = _fold(gen, "maxOutputTokens", "max_output_tokens")
                n = _from_string(sent) if isinstance(sent, str) else sent
                below = isinstance(n, (int, float)) and not isinstance(n, bool) and n <= max_tokens
                gen["maxOutputTokens"] = sent if below else max_tokens
                body["generationConfig"] = gen
        call.native = body

    async def serve(self, gateway: Any, ctx: RequestContext, request: Request, responder: Responder,
                    op: str) -> None:
        if op == "countTokens":
            await self._count(gateway, ctx, request, responder)
            return
        # max_tokens, or max_completion_tokens where the route's OpenAI steps run reasoning models (they refuse
        # the other): the field the gateway fills for a key's cap on that route.
        model = route_from_path(request.path)
        call = self.parse(request, gateway.decode_body, gateway.token_field(model), self.native_only(gateway, model))
        assert isinstance(call, GeminiCall)
        await gateway.run_call(ctx, call, responder)

    async def _count(self, gateway: Any, ctx: RequestContext, request: Request, responder: Responder) -> None:
        """countTokens: the route's gemini/vertex steps asked in turn (the others skipped, not tried); when none
        answers, an estimate marked ``x-gateway-token-count: estimated``. A 400 from the API is the client's to
        fix and is passed on. No limits are charged: counting generates nothing."""
        body = gateway.decode_body(request.body)
        if not isinstance(body, dict):
            raise invalid("the request body must be a JSON object (a CountTokensRequest)")
        model = route_from_path(request.path)
        route = gateway.config.routes.get(model) if ctx.key is None else None
        if route is None:
            route = gateway.named_route(ctx, model)  # 404, or 403 for a client key without this route
        ctx.route = route.name
        steps = tuple(s for s in route.steps if s.provider in gateway.targets
                      and gateway.targets[s.provider].adapters[0].native(COUNT, s))
        result: Completion | None = None
        if steps:
            call = _CountCall(self, model, {"model": model, "messages": []}, body, stream=False)
            try:
                result = await gateway.router.complete(ctx, Route(route.name, steps, route.limits), call.chat, call)
            except GatewayError as exc:
                if exc.status == 400:
                    raise
        headers = [self.content_type]
        if result is None:
            data = dumps({"totalTokens": estimate_tokens(body)})
            headers.append((b"x-gateway-token-count", b"estimated"))
        else:
            data = result.body
        ctx.usage = None
        ctx.status = 200
        await responder.send(200, [*headers, *ctx.gateway_headers()], data)
        ctx.first_byte = time.perf_counter()
