"""A mock of OpenAI's Responses API (``POST /v1/responses``) on top of MockUpstream.

It speaks the real wire format: ``response`` objects as JSON, streams as SSE events named by
``event:`` lines and carrying a ``sequence_number`` (``response.created``, ``response.in_progress``,
``response.output_item.added``, ``response.content_part.added``, ``response.output_text.delta`` /
``.done``, ``response.content_part.done``, ``response.function_call_arguments.delta`` / ``.done``,
``response.custom_tool_call_input.delta`` / ``.done``, reasoning summary events,
``response.output_item.done``, then ``response.completed`` / ``response.incomplete`` /
``response.failed``; no ``[DONE]``), and errors as ``{"error": {"message", "type", "param", "code"}}``.

Every request is checked, first with the official ``openai`` SDK's own request type
(``ResponseCreateParams``, strictly: wrong types, unknown fields anywhere and missing required ones
are problems), then with the rules the service adds (``max_output_tokens`` >= 16, strict function
schemas, every ``function_call_output`` answering a call and every call answered, content part types
per role, ``previous_response_id`` and reasoning items the mock knows, ...). A request that breaks
them gets the 400 ``invalid_request_error`` the real API would send, and the problems are kept in
:attr:`ResponsesMock.problems` so tests can assert there were none. Everything the mock sends (the
``response`` object and each stream event) is validated with the SDK's own types, and a stream is
replayed through the SDK's own stream accumulator, so the mock cannot drift from the format unnoticed.

Like the real service, the mock keeps the responses it answered (unless the request said ``store:
false``), so ``previous_response_id`` works against it and ``GET /v1/responses/{id}`` answers them.

Typical use::

    mock = ResponsesMock(upstream)
    mock.on("gpt-r", lambda body: response(message("Hello!"), usage=usage(10, 3, cached=4)))
    mock.on("gpt-tool", lambda body: response(function_call("call_1", "get_weather", {"city": "Paris"})))
    mock.on("gpt-cut", lambda body: stream_reply(stream_events(response(message("long text"))), reset_after=4))
    mock.on("gpt-fail", lambda body: stream_reply(failed_events("rate_limit_exceeded", "slow down")))
    mock.on("gpt-429", lambda body: error_reply(429, "Rate limit reached", "requests", "rate_limit_exceeded"))
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import openai.types.responses as rtypes
from openai._types import omit
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import (
    easy_input_message_param,
    response_create_params,
    response_input_item_param,
    response_output_message_param,
    tool_param,
)
from pydantic import BaseModel, TypeAdapter, ValidationError

from tests.mock_upstream import MockUpstream, Received, Reply

API_KEY = "sk-openai-responses-test-secret"
PATH = "/v1/responses"
DEFAULT_MODEL = "gpt-mock"
MIN_OUTPUT_TOKENS = 16  # the API refuses less: "integer_below_min_value"

# Fields a create request may have: the SDK's request type (the streaming variant adds only `stream`).
REQUEST_KEYS = (response_create_params.ResponseCreateParamsBase.__required_keys__
                | response_create_params.ResponseCreateParamsBase.__optional_keys__ | {"stream"})
NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
USER_PARTS = {"input_text", "input_image", "input_file"}
ASSISTANT_PARTS = {"output_text", "refusal"}
CALL_TYPES = {"function_call": "function_call_output", "custom_tool_call": "custom_tool_call_output"}
# error.code values the service sends in `response.failed` that the SDK's Literal does not list yet
# (Codex CLI acts on each of them: context_length_exceeded, insufficient_quota, usage_not_included).
EXTRA_FAILURE_CODES = {"insufficient_quota", "context_length_exceeded", "usage_not_included", "invalid_request"}


def _event_classes() -> dict[str, type[BaseModel]]:
    union = typing.get_args(rtypes.ResponseStreamEvent)[0]  # Annotated[Union[...], PropertyInfo]
    out: dict[str, type[BaseModel]] = {}
    for cls in typing.get_args(union):
        (literal,) = typing.get_args(cls.model_fields["type"].annotation)
        out[literal] = cls
    return out


EVENT_TYPES = _event_classes()
_ids = itertools.count(1)


def new_id(prefix: str) -> str:
    """An id shaped like the API's (``resp_…``, ``msg_…``, ``fc_…``), unique in this test process."""
    return f"{prefix}_{next(_ids):048x}"


# ---------------------------------------------------------------------------
# Validation with the SDK's types
# ---------------------------------------------------------------------------

class Problem(NamedTuple):
    param: str
    text: str
    code: str = "invalid_value"

    def __str__(self) -> str:
        return f"{self.param}: {self.text}"


def _solid(value: Any, where: str, p: list[Problem]) -> Any:
    """The validated value with pydantic's lazy iterators (``Iterable[...]`` fields) run, so their
    elements get validated too (pydantic checks those only as they are iterated)."""
    if isinstance(value, dict):
        return {k: _solid(v, f"{where}.{k}" if where else k, p) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_solid(v, f"{where}[{i}]", p) for i, v in enumerate(value)]
    if isinstance(value, Iterator):
        out = []
        for i in itertools.count():
            try:
                item = next(value)
            except StopIteration:
                break
            except ValidationError as exc:  # its loc starts with the item's index
                _type_errors(exc, where, p)
                break
            out.append(_solid(item, f"{where}[{i}]", p))
        return out
    return value


_UNION_TAGS = {"str", "list", "dict", "int", "float", "bool", "none"}


def _is_tag(x: Any) -> bool:
    """A loc part that names a union member (``list[union[...]]``, ``ResponseInputTextParam``), not a field."""
    return isinstance(x, str) and (x in _UNION_TAGS or "[" in x or "-" in x or x[:1].isupper())


def _type_errors(exc: ValidationError, where: str, p: list[Problem]) -> None:
    seen: set[str] = set()
    for e in exc.errors():
        loc = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in e["loc"] if not _is_tag(x))
        problem = Problem((where + loc).lstrip("."), e["msg"], "missing_required_parameter"
                          if e["type"] == "missing" else "invalid_type")
        if str(problem) not in seen and len(seen) < 6:
            seen.add(str(problem))
            p.append(problem)


def _dropped(sent: Any, kept: Any, where: str, p: list[Problem]) -> None:
    """What validation left out of ``sent``: keys no type of that place has (unknown parameters)."""
    if isinstance(sent, dict) and isinstance(kept, dict):
        for k, v in sent.items():
            path = f"{where}.{k}" if where else k
            if k not in kept:
                p.append(Problem(path, f"Unknown parameter: '{path}'.", "unknown_parameter"))
            else:
                _dropped(v, kept[k], path, p)
    elif isinstance(sent, list) and isinstance(kept, list):
        for i, (s, k) in enumerate(zip(sent, kept, strict=False)):
            _dropped(s, k, f"{where}[{i}]", p)


def _literals(tp: Any) -> list[str]:
    if typing.get_origin(tp) is typing.Literal:
        return [str(a) for a in typing.get_args(tp)]
    return [x for a in typing.get_args(tp) for x in _literals(a)]


def _by_type(union: Any) -> dict[str, type]:
    """The members of an SDK union of TypedDicts by the ``type`` value each takes (first one wins)."""
    out: dict[str, type] = {}
    for cls in typing.get_args(union):
        for lit in _literals(typing.get_type_hints(cls).get("type")):
            out.setdefault(lit, cls)
    return out


INPUT_ITEM_TYPES = _by_type(response_input_item_param.ResponseInputItemParam)
TOOL_TYPES = _by_type(tool_param.ToolParam)
_adapters: dict[Any, TypeAdapter[Any]] = {}


def _strictly(tp: Any, value: Any, where: str, p: list[Problem]) -> None:
    """``value`` against one SDK type, strictly: wrong types, missing and unknown fields are problems."""
    ta = _adapters.get(tp)
    if ta is None:
        ta = _adapters[tp] = TypeAdapter(tp)
    try:
        kept = _solid(ta.validate_python(value, strict=True), where, p)
    except ValidationError as exc:
        _type_errors(exc, where, p)
        return
    _dropped(value, kept, where, p)


def _with_api_defaults(kind: str, item: dict[str, Any]) -> dict[str, Any]:
    """An item with what the API fills in where the SDK's type marks a field required: a function tool's
    ``strict`` (default true) and ``parameters``; an assistant message given back with output parts (as
    Codex CLI sends history) needs no ``id``, ``status`` or ``annotations``."""
    if kind == "function":
        return {"strict": True, "parameters": None, **item}
    if kind == "assistant":
        content = [{"annotations": [], **c} if isinstance(c, dict) and c.get("type") == "output_text" else c
                   for c in item["content"]]
        return {"id": "msg_given", "status": "completed", "type": "message", **item, "content": content}
    return item


def validate_params(body: dict[str, Any]) -> list[Problem]:
    """``body`` against the SDK's ``ResponseCreateParams``: types, required fields, unknown fields. Input
    items and tools are checked one by one against the SDK type their ``type`` names."""
    p: list[Problem] = []
    for k in sorted(set(body) - REQUEST_KEYS):
        p.append(Problem(k, f"Unknown parameter: '{k}'.", "unknown_parameter"))
    rest = {k: v for k, v in body.items() if k in REQUEST_KEYS and k not in ("stream", "input", "tools")}
    _strictly(response_create_params.ResponseCreateParamsBase, rest, "", p)
    if "stream" in body and body["stream"] is not None and not isinstance(body["stream"], bool):
        p.append(Problem("stream", "must be a boolean", "invalid_type"))
    items = body.get("input")
    if isinstance(items, list):
        for i, it in enumerate(items):
            w = f"input[{i}]"
            if not isinstance(it, dict):
                p.append(Problem(w, "must be an object", "invalid_type"))
                continue
            kind = str(it.get("type", "message"))
            cls = INPUT_ITEM_TYPES.get(kind)
            if kind == "message" and it.get("role") == "assistant" and isinstance(it.get("content"), list) \
                    and all(isinstance(c, dict) and c.get("type") in ASSISTANT_PARTS for c in it["content"]):
                _strictly(response_output_message_param.ResponseOutputMessageParam,
                          _with_api_defaults("assistant", it), w, p)
            elif kind == "message":
                _strictly(easy_input_message_param.EasyInputMessageParam, it, w, p)
            elif cls is None:
                p.append(Problem(f"{w}.type", f"Invalid value: '{kind}'.", "invalid_value"))
            else:
                _strictly(cls, it, w, p)
    elif items is not None and not isinstance(items, str):
        p.append(Problem("input", "must be a string or a list of items", "invalid_type"))
    tools = body.get("tools")
    if isinstance(tools, list):
        for i, t in enumerate(tools):
            kind = str(t.get("type")) if isinstance(t, dict) else ""
            cls = TOOL_TYPES.get(kind)
            if cls is None:
                p.append(Problem(f"tools[{i}].type", f"Invalid value: '{kind}'.", "invalid_value"))
            else:
                _strictly(cls, _with_api_defaults(kind, t), f"tools[{i}]", p)
    elif tools is not None:
        p.append(Problem("tools", "must be a list", "invalid_type"))
    return p


def _extras(obj: Any, where: str, out: list[str]) -> None:
    """Fields the SDK's models do not know (they allow extras; the mock must not send any)."""
    if isinstance(obj, BaseModel):
        for k in (obj.model_extra or {}):
            out.append(f"{where}.{k}")
        for name in type(obj).model_fields:
            _extras(getattr(obj, name), f"{where}.{name}", out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _extras(v, f"{where}[{i}]", out)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _extras(v, f"{where}.{k}", out)


def checked(model: type[BaseModel], value: dict[str, Any], where: str) -> BaseModel:
    """``value`` as the SDK's ``model``, strictly: AssertionError for a wrong type or an unknown field."""
    try:
        obj = model.model_validate(value, strict=True)
    except ValidationError as exc:
        raise AssertionError(f"mock {where} does not fit openai.types.responses.{model.__name__}: {exc}") from None
    extra: list[str] = []
    _extras(obj, where, extra)
    assert not extra, f"mock {where} has fields {model.__name__} does not know: {extra}"
    return obj


def _as_sdk_code(value: dict[str, Any]) -> dict[str, Any]:
    """A response whose ``error.code`` is one the service sends but the SDK's Literal lacks, with a listed
    code instead, for the type check only."""
    err = value.get("error")
    if isinstance(err, dict) and err.get("code") in EXTRA_FAILURE_CODES:
        return {**value, "error": {**err, "code": "server_error"}}
    return value


def check_response(resp: dict[str, Any]) -> rtypes.Response:
    obj = checked(rtypes.Response, _as_sdk_code(resp), "response")
    assert isinstance(obj, rtypes.Response)
    return obj


def check_event(ev: dict[str, Any]) -> BaseModel:
    cls = EVENT_TYPES.get(str(ev.get("type")))
    assert cls is not None, f"unknown stream event type {ev.get('type')!r}"
    value = ev
    if isinstance(ev.get("response"), dict):
        value = {**ev, "response": _as_sdk_code(ev["response"])}
    return checked(cls, value, f"event {ev['type']}")


def check_events(events: list[dict[str, Any]]) -> None:
    """Each event is the SDK's type, sequence numbers count up from 0, and the SDK's own accumulator
    (what ``client.responses.stream`` runs) accepts the sequence: items added before their deltas,
    finished before the response completes, one response id throughout."""
    state: ResponseStreamState[Any] = ResponseStreamState(input_tools=[], text_format=omit)
    for i, ev in enumerate(events):
        assert ev.get("sequence_number") == i, f"event {i} ({ev.get('type')}) has sequence_number " \
                                               f"{ev.get('sequence_number')}"
        obj = check_event(ev)
        if ev["type"] == "error":
            continue
        try:
            state.handle_event(obj)  # type: ignore[arg-type]
        except (RuntimeError, AssertionError) as exc:
            raise AssertionError(f"the SDK's accumulator refuses event {i} ({ev['type']}): {exc!r}") from None


# ---------------------------------------------------------------------------
# Request rules the service adds to the types
# ---------------------------------------------------------------------------

def strict_schema_problems(schema: Any, where: str) -> list[str]:
    """What strict mode (Structured Outputs) refuses in a JSON schema: every object needs
    ``additionalProperties: false`` and ``required`` naming every property."""
    out: list[str] = []

    def walk(s: Any, ctx: str) -> None:
        if not isinstance(s, dict):
            return
        kinds = s.get("type")
        is_object = kinds == "object" or (isinstance(kinds, list) and "object" in kinds) or "properties" in s
        if is_object:
            if s.get("additionalProperties") is not False:
                out.append(f"In context=({ctx}), 'additionalProperties' is required to be supplied and to be false.")
            props = s.get("properties") or {}
            missing = [k for k in props if k not in (s.get("required") or [])]
            if missing:
                out.append(f"In context=({ctx}), 'required' is required to be supplied and to be an array "
                           f"including every key in properties. Missing '{missing[0]}'.")
            for k, v in props.items():
                walk(v, f"{ctx}'properties', '{k}'" if not ctx else f"{ctx}, 'properties', '{k}'")
        if "items" in s:
            walk(s["items"], f"{ctx}, 'items'".lstrip(", "))
        for key in ("anyOf", "$defs", "definitions"):
            sub = s.get(key)
            for k, v in (sub.items() if isinstance(sub, dict) else enumerate(sub or [])):
                walk(v, f"{ctx}, '{key}', '{k}'".lstrip(", "))

    if not isinstance(schema, dict) or schema.get("type") != "object":
        return [f"Invalid schema for {where}: schema must be a JSON Schema of 'type: \"object\"'."]
    walk(schema, "")
    return [f"Invalid schema for {where}: {m}" for m in out]


def _tools(body: dict[str, Any], p: list[Problem]) -> dict[str, str]:
    """The client tools by name (name -> ``function`` | ``custom``), checking names and strict schemas."""
    names: dict[str, str] = {}
    for i, t in enumerate(body.get("tools") or []):
        if not isinstance(t, dict) or t.get("type") not in ("function", "custom"):
            continue
        name = str(t.get("name"))
        if not NAME_RE.match(name):
            p.append(Problem(f"tools[{i}].name", f"string does not match pattern. Expected a string that "
                             f"matches the pattern '{NAME_RE.pattern}'."))
        elif name in names:
            p.append(Problem(f"tools[{i}].name", f"Duplicate tool name '{name}'."))
        names[name] = t["type"]
        if t["type"] == "function" and t.get("strict", True) is not False:
            params = t.get("parameters")
            for m in strict_schema_problems(params if params is not None else {"type": "object", "properties": {},
                                                                               "additionalProperties": False},
                                            f"function '{name}'"):
                p.append(Problem(f"tools[{i}].parameters", m, "invalid_function_parameters"))
    return names


def _tool_choice(body: dict[str, Any], names: dict[str, str], p: list[Problem]) -> None:
    tc = body.get("tool_choice")
    if isinstance(tc, dict) and tc.get("type") in ("function", "custom"):
        if names.get(str(tc.get("name"))) != tc["type"]:
            p.append(Problem("tool_choice", f"Tool choice '{tc.get('name')}' not found in 'tools' parameter."))
    elif tc in ("required",) and not body.get("tools"):
        p.append(Problem("tool_choice", "Tool choice 'required' must be specified with 'tools' parameter."))


def _input(body: dict[str, Any], history: Mapping[str, dict[str, Any]] | None, p: list[Problem]) -> None:
    items = body.get("input")
    pending: dict[str, str] = {}  # call_id -> the output type it needs
    known_items: set[str] = set()
    prev = body.get("previous_response_id")
    if prev is not None and history is not None:
        if prev not in history:
            p.append(Problem("previous_response_id", f"Previous response with id '{prev}' not found.",
                             "previous_response_not_found"))
        else:
            for rid in _chain(prev, history):
                stored = history[rid]
                for it in stored["response"]["output"]:
                    known_items.add(str(it.get("id")))
                for it in _input_items(stored["request"]):
                    known_items.add(str(it.get("id")))
            for it in history[prev]["response"]["output"]:
                if it.get("type") in CALL_TYPES:
                    pending[str(it.get("call_id"))] = CALL_TYPES[it["type"]]
    elif history is not None:
        known_items = {str(it.get("id")) for stored in history.values() for it in stored["response"]["output"]}
    if items is None:
        if prev is None and body.get("prompt") is None and body.get("conversation") is None:
            p.append(Problem("input", "Missing required parameter: 'input'.", "missing_required_parameter"))
        return
    if isinstance(items, str):
        return
    answered: set[str] = set()
    for i, it in enumerate(items):
        if not isinstance(it, dict):
            continue
        w = f"input[{i}]"
        kind = it.get("type", "message")
        if kind == "message":
            role = it.get("role")
            allowed = ASSISTANT_PARTS if role == "assistant" else USER_PARTS
            content = it.get("content")
            for j, part in enumerate(content if isinstance(content, list) else []):
                if isinstance(part, dict) and part.get("type") not in allowed:
                    p.append(Problem(f"{w}.content[{j}]", f"Invalid value: '{part.get('type')}'. Supported values "
                                     f"are: {', '.join(repr(a) for a in sorted(allowed))}."))
        elif kind in CALL_TYPES:
            pending[str(it.get("call_id"))] = CALL_TYPES[kind]
        elif kind in CALL_TYPES.values():
            cid = str(it.get("call_id"))
            if pending.get(cid) != kind:
                p.append(Problem(w, f"No tool call found for {kind.replace('_', ' ')} with call_id {cid}."))
            answered.add(cid)
        elif kind == "reasoning" and not it.get("encrypted_content") and str(it.get("id")) not in known_items:
            p.append(Problem(w, f"Item with id '{it.get('id')}' not found. Items are not persisted when `store` "
                             "is set to false. Try again with `store` set to true, or remove this item from "
                             "your input.", "item_not_found"))
        elif kind == "item_reference" and str(it.get("id")) not in known_items:
            p.append(Problem(w, f"Item with id '{it.get('id')}' not found.", "item_not_found"))
    for cid in pending:
        if cid not in answered:
            p.append(Problem("input", f"No tool output found for function call {cid}."))


def _input_items(body: dict[str, Any]) -> list[dict[str, Any]]:
    items = body.get("input")
    return [it for it in items if isinstance(it, dict)] if isinstance(items, list) else []


def _chain(rid: str, history: Mapping[str, dict[str, Any]]) -> list[str]:
    out: list[str] = []
    while rid in history and rid not in out:
        out.append(rid)
        rid = history[rid]["request"].get("previous_response_id")
    return out


def check_request(rec: Received, api_key: str = API_KEY,
                  history: Mapping[str, dict[str, Any]] | None = None) -> list[Problem]:
    """Every way the request breaks the Responses API (empty when none). ``history``: the responses the
    service keeps (id -> {"request", "response"}), for ``previous_response_id`` and item ids."""
    p: list[Problem] = []
    if rec.method != "POST" or rec.path != PATH:
        p.append(Problem("request", f"expected POST {PATH}, got {rec.method} {rec.path}"))
    h = rec.headers
    if h.get("authorization") != f"Bearer {api_key}":
        p.append(Problem("authorization", "missing or wrong bearer key", "invalid_api_key"))
    if "application/json" not in h.get("content-type", ""):
        p.append(Problem("content-type", "must be application/json"))
    try:
        body = json.loads(rec.body)
    except ValueError:
        return [*p, Problem("body", "We could not parse the JSON body of your request.")]
    if not isinstance(body, dict):
        return [*p, Problem("body", "must be a JSON object")]
    types = validate_params(body)
    p += types
    if types:
        return p
    if not isinstance(body.get("model"), str) or not body["model"]:
        p.append(Problem("model", "Missing required parameter: 'model'.", "missing_required_parameter"))
    mot = body.get("max_output_tokens")
    if isinstance(mot, int) and mot < MIN_OUTPUT_TOKENS:
        p.append(Problem("max_output_tokens", f"Invalid 'max_output_tokens': integer below minimum value. "
                         f"Expected a value >= {MIN_OUTPUT_TOKENS}, but got {mot} instead.",
                         "integer_below_min_value"))
    for key, hi in (("temperature", 2), ("top_p", 1)):
        v = body.get(key)
        if isinstance(v, (int, float)) and not 0 <= v <= hi:
            p.append(Problem(key, f"Invalid '{key}': must be between 0 and {hi}."))
    tl = body.get("top_logprobs")
    if isinstance(tl, int) and not 0 <= tl <= 20:
        p.append(Problem("top_logprobs", "Invalid 'top_logprobs': must be between 0 and 20."))
    if body.get("stream_options") is not None and body.get("stream") is not True:
        p.append(Problem("stream_options", "Invalid value for 'stream_options': stream_options is only allowed "
                         "when 'stream' is enabled."))
    if body.get("previous_response_id") is not None and body.get("conversation") is not None:
        p.append(Problem("previous_response_id", "Parameters 'previous_response_id' and 'conversation' cannot "
                         "be used together."))
    md = body.get("metadata")
    if isinstance(md, dict) and (len(md) > 16 or any(len(k) > 64 or len(str(v)) > 512 for k, v in md.items())):
        p.append(Problem("metadata", "at most 16 pairs, keys up to 64 and values up to 512 characters"))
    fmt = (body.get("text") or {}).get("format") or {}
    if fmt.get("type") == "json_schema":
        if not NAME_RE.match(str(fmt.get("name"))):
            p.append(Problem("text.format.name", f"must match {NAME_RE.pattern}"))
        if fmt.get("strict") is True:
            p += [Problem("text.format.schema", m) for m in strict_schema_problems(fmt.get("schema"),
                                                                                   f"'{fmt.get('name')}'")]
    names = _tools(body, p)
    _tool_choice(body, names, p)
    _input(body, history, p)
    return p


# ---------------------------------------------------------------------------
# Answers
# ---------------------------------------------------------------------------

def usage(input_tokens: int = 12, output_tokens: int = 6, *, cached: int = 0, reasoning: int = 0,
          cache_write: int = 0) -> dict[str, Any]:
    """The ``usage`` of a response: ``cached`` input tokens are part of ``input_tokens``, ``reasoning``
    tokens part of ``output_tokens``, as the API counts them."""
    return {"input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": cache_write},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": input_tokens + output_tokens}


_usage = usage  # `response(usage=...)` hides the function


def message(text: str = "", *, refusal: str | None = None, item_id: str | None = None,
            status: str = "completed") -> dict[str, Any]:
    """An assistant ``message`` output item with one ``output_text`` part (or one ``refusal`` part)."""
    part = ({"type": "refusal", "refusal": refusal} if refusal is not None
            else {"type": "output_text", "text": text, "annotations": [], "logprobs": []})
    return {"id": item_id or new_id("msg"), "type": "message", "status": status, "role": "assistant",
            "content": [part]}


def function_call(call_id: str, name: str, arguments: str | dict[str, Any] = "{}", *,
                  item_id: str | None = None) -> dict[str, Any]:
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, separators=(",", ":"))
    return {"id": item_id or new_id("fc"), "type": "function_call", "status": "completed", "arguments": args,
            "call_id": call_id, "name": name}


def custom_tool_call(call_id: str, name: str, input: str, *, item_id: str | None = None) -> dict[str, Any]:
    """A freeform tool's call (``custom`` tools such as Codex's ``apply_patch``): ``input`` is plain text."""
    return {"id": item_id or new_id("ctc"), "type": "custom_tool_call", "call_id": call_id, "name": name,
            "input": input}


def reasoning(*summary: str, encrypted_content: str | None = None, item_id: str | None = None) -> dict[str, Any]:
    """A ``reasoning`` item: summary texts, and the opaque ``encrypted_content`` clients send back with
    ``store: false`` (what ``include: ["reasoning.encrypted_content"]`` asks for)."""
    item: dict[str, Any] = {"id": item_id or new_id("rs"), "type": "reasoning",
                            "summary": [{"type": "summary_text", "text": s} for s in summary]}
    if encrypted_content is not None:
        item["encrypted_content"] = encrypted_content
    return item


def response(*items: dict[str, Any], usage: dict[str, Any] | None = None, model: str = DEFAULT_MODEL,
             resp_id: str | None = None, status: str = "completed", incomplete: str | None = None,
             error: dict[str, Any] | None = None, created_at: int = 1_741_000_000,
             **fields: Any) -> dict[str, Any]:
    """A ``response`` object as the API sends it, validated with the SDK's ``Response``. The mock fills
    the fields the API echoes from the request (model, instructions, tools, ...) when it answers.
    ``incomplete``: a reason such as ``max_output_tokens`` (status ``incomplete``)."""
    if incomplete is not None:
        status = "incomplete"
    resp: dict[str, Any] = {
        "id": resp_id or new_id("resp"), "object": "response", "created_at": created_at, "status": status,
        "background": False, "completed_at": created_at + 1 if status == "completed" else None,
        "error": error, "incomplete_details": {"reason": incomplete} if incomplete else None,
        "instructions": None, "max_output_tokens": None, "max_tool_calls": None, "model": model,
        "output": list(items), "parallel_tool_calls": True, "previous_response_id": None,
        "prompt_cache_key": None, "reasoning": {"effort": None, "summary": None}, "safety_identifier": None,
        "service_tier": "default", "temperature": 1.0, "text": {"format": {"type": "text"}, "verbosity": "medium"},
        "tool_choice": "auto", "tools": [], "top_logprobs": 0, "top_p": 1.0, "truncation": "disabled",
        "usage": usage if usage is not None or status == "failed" else _usage(),
        "user": None, "metadata": {}, **fields,
    }
    check_response(resp)
    return resp


def failed(code: str, message: str, *items: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """A ``response`` with status ``failed`` and its ``error`` (what ``response.failed`` carries)."""
    return response(*items, status="failed", error={"code": code, "message": message}, usage=None, **fields)


ECHOED = ("instructions", "max_output_tokens", "max_tool_calls", "parallel_tool_calls", "previous_response_id",
          "prompt_cache_key", "safety_identifier", "temperature", "tool_choice", "top_logprobs", "top_p",
          "truncation", "user", "metadata", "service_tier", "background")


def echo(body: dict[str, Any], resp: dict[str, Any]) -> dict[str, Any]:
    """``resp`` with what the API copies from the request into every response object."""
    out = copy.deepcopy(resp)
    if out["model"] == DEFAULT_MODEL and isinstance(body.get("model"), str):
        out["model"] = body["model"]
    for key in ECHOED:
        if body.get(key) is not None:
            out[key] = body[key]
    if isinstance(body.get("reasoning"), dict):
        out["reasoning"] = {"effort": None, "summary": None, **body["reasoning"]}
    if isinstance(body.get("text"), dict):
        out["text"] = {"format": {"type": "text"}, "verbosity": "medium", **body["text"]}
    if isinstance(body.get("tools"), list):
        out["tools"] = [{"description": None, "strict": True, "parameters": None, **t}
                        if t.get("type") == "function" else t for t in body["tools"]]
    check_response(out)
    return out


def split(s: str, n: int) -> list[str]:
    return [s[i:i + n] for i in range(0, len(s), n)] or [""]


def _head(resp: dict[str, Any]) -> dict[str, Any]:
    """The response as ``response.created`` shows it: in progress, nothing output yet."""
    return {**resp, "status": "in_progress", "output": [], "usage": None, "completed_at": None, "error": None,
            "incomplete_details": None}


def item_events(item: dict[str, Any], index: int, piece: int = 4) -> list[dict[str, Any]]:
    """The events that stream one output item (without sequence numbers)."""
    iid = item["id"]
    kind = item["type"]
    base = {"item_id": iid, "output_index": index}
    if kind == "message":
        ev: list[dict[str, Any]] = [{"type": "response.output_item.added", "output_index": index,
                                     "item": {**item, "status": "in_progress", "content": []}}]
        for ci, part in enumerate(item["content"]):
            where = {**base, "content_index": ci}
            if part["type"] == "output_text":
                ev.append({"type": "response.content_part.added", **where,
                           "part": {**part, "text": "", "annotations": [], "logprobs": []}})
                for frag in split(part["text"], piece):
                    ev.append({"type": "response.output_text.delta", **where, "delta": frag, "logprobs": []})
                ev.append({"type": "response.output_text.done", **where, "text": part["text"], "logprobs": []})
            else:
                ev.append({"type": "response.content_part.added", **where, "part": {**part, "refusal": ""}})
                for frag in split(part["refusal"], piece):
                    ev.append({"type": "response.refusal.delta", **where, "delta": frag})
                ev.append({"type": "response.refusal.done", **where, "refusal": part["refusal"]})
            ev.append({"type": "response.content_part.done", **where, "part": part})
    elif kind == "function_call":
        ev = [{"type": "response.output_item.added", "output_index": index,
               "item": {**item, "status": "in_progress", "arguments": ""}}]
        ev += [{"type": "response.function_call_arguments.delta", **base, "delta": frag}
               for frag in split(item["arguments"], piece)]
        ev.append({"type": "response.function_call_arguments.done", **base, "arguments": item["arguments"]})
    elif kind == "custom_tool_call":
        ev = [{"type": "response.output_item.added", "output_index": index, "item": {**item, "input": ""}}]
        ev += [{"type": "response.custom_tool_call_input.delta", **base, "delta": frag}
               for frag in split(item["input"], piece)]
        ev.append({"type": "response.custom_tool_call_input.done", **base, "input": item["input"]})
    elif kind == "reasoning":
        ev = [{"type": "response.output_item.added", "output_index": index, "item": {**item, "summary": []}}]
        for si, s in enumerate(item["summary"]):
            where = {**base, "summary_index": si}
            ev.append({"type": "response.reasoning_summary_part.added", **where,
                       "part": {"type": "summary_text", "text": ""}})
            ev += [{"type": "response.reasoning_summary_text.delta", **where, "delta": frag}
                   for frag in split(s["text"], piece)]
            ev.append({"type": "response.reasoning_summary_text.done", **where, "text": s["text"]})
            ev.append({"type": "response.reasoning_summary_part.done", **where, "part": s})
    else:
        ev = [{"type": "response.output_item.added", "output_index": index, "item": item}]
    ev.append({"type": "response.output_item.done", "output_index": index, "item": item})
    return ev


def numbered(events: Iterable[dict[str, Any]], start: int = 0) -> list[dict[str, Any]]:
    """``events`` with their ``sequence_number`` (0, 1, 2, ... as the API counts them)."""
    return [{**ev, "sequence_number": start + i} for i, ev in enumerate(events)]


def stream_events(resp: dict[str, Any], piece: int = 4) -> list[dict[str, Any]]:
    """The documented event sequence that streams ``resp``, ending with ``response.completed`` (or
    ``response.incomplete`` / ``response.failed`` for such a response); checked with the SDK."""
    head = _head(resp)
    ev: list[dict[str, Any]] = [{"type": "response.created", "response": head},
                                {"type": "response.in_progress", "response": head}]
    for i, item in enumerate(resp["output"]):
        ev += item_events(item, i, piece)
    end = {"completed": "response.completed", "incomplete": "response.incomplete",
           "failed": "response.failed"}[resp["status"]]
    ev.append({"type": end, "response": resp})
    out = numbered(ev)
    check_events(out)
    return out


def failed_events(code: str, message: str, *items: dict[str, Any], piece: int = 4,
                  **fields: Any) -> list[dict[str, Any]]:
    """A stream that fails: created, in progress, ``items`` streamed whole, then ``response.failed``
    with ``error.code`` (``rate_limit_exceeded``, ``server_error``, ``insufficient_quota``, ...)."""
    return stream_events(failed(code, message, *items, **fields), piece)


def error_event(code: str | None, message: str, sequence_number: int, param: str | None = None) -> dict[str, Any]:
    """The ``error`` stream event (the API sends it for a failure outside a response, e.g. a bad request
    found after the stream started)."""
    ev = {"type": "error", "code": code, "message": message, "param": param, "sequence_number": sequence_number}
    check_event(ev)
    return ev


def sse(ev: dict[str, Any]) -> bytes:
    """One event framed as the API frames it: ``event: <type>`` and one ``data:`` line."""
    return f"event: {ev['type']}\ndata: {json.dumps(ev, separators=(',', ':'))}\n\n".encode()


def frame(events: list[dict[str, Any]]) -> list[bytes]:
    for ev in events:
        check_event(ev)
    return [sse(ev) for ev in events]


def stream_reply(events: list[dict[str, Any]], reset_after: int | None = None, **reply: Any) -> Reply:
    """A streamed answer (no ``[DONE]``: the Responses API ends with its last event); ``reset_after``:
    the connection is reset after that many events (a broken stream)."""
    return Reply(sse=frame(events), done=False, reset_after=reset_after, **reply)


def error_body(message: str, type: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_reply(status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                param: str | None = None, headers: dict[str, str] | None = None) -> Reply:
    """An HTTP error as the API sends it; e.g. ``error_reply(429, "Rate limit reached", "requests",
    "rate_limit_exceeded")``, ``error_reply(429, "You exceeded your current quota", "insufficient_quota",
    "insufficient_quota")``, ``error_reply(500, "The server had an error", "server_error")``."""
    return Reply(status=status, body=error_body(message, type, code, param),
                 headers={"x-request-id": "req_mock", **(headers or {})})


def provider(upstream: MockUpstream, name: str = "oair", **extra: Any) -> dict[str, Any]:
    """A gateway provider entry speaking Responses to this mock (``type: openai``, ``wire_api: responses``)."""
    return {"name": name, "type": "openai", "wire_api": "responses", "base_url": upstream.url + "/v1",
            "api_key": API_KEY, **extra}


# ---------------------------------------------------------------------------
# The mock
# ---------------------------------------------------------------------------

Scenario = Callable[[dict[str, Any]], "dict[str, Any] | Reply"]


@dataclass
class ResponsesMock:
    """Responses API behaviours by model name, on a MockUpstream; requests checked as they come.

    A scenario takes the request body and returns a ``response`` dict (from :func:`response`: sent as
    JSON, or as the documented event stream when the request asked to stream, after the fields the API
    echoes are filled in from the request) or a ready Reply (errors, failed or cut streams).
    ``stored``: the responses kept (id -> {"request", "response"}), as the service keeps them unless a
    request says ``store: false``; ``GET /v1/responses/{id}`` answers them.
    """

    upstream: MockUpstream
    api_key: str = API_KEY
    problems: list[str] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    stored: dict[str, dict[str, Any]] = field(default_factory=dict)

    def on(self, model: str, scenario: Scenario) -> None:
        self.upstream.replies[model] = lambda rec: self._answer(rec, scenario)

    def _answer(self, rec: Received, scenario: Scenario) -> Reply:
        try:
            return self._serve(rec, scenario)
        except Exception as exc:  # a broken scenario or helper: make it visible, never a silent reset
            self.problems.append(f"mock: {exc!r}")
            return error_reply(500, f"mock failure: {exc}", "server_error")

    def _serve(self, rec: Received, scenario: Scenario) -> Reply:
        problems = check_request(rec, self.api_key, self.stored)
        if problems:
            self.problems += [str(x) for x in problems]
            # The API names one problem (the first), with its param and code; the others follow for debugging.
            first = problems[0]
            status = 401 if first.code == "invalid_api_key" else 400
            more = f" (and: {'; '.join(str(x) for x in problems[1:])})" if len(problems) > 1 else ""
            return error_reply(status, first.text + more, code=first.code, param=first.param)
        body = rec.json
        self.requests.append(body)
        result = scenario(body)
        if isinstance(result, Reply):
            return result
        resp = echo(body, result)
        if body.get("store", True) is not False and resp["status"] != "failed":
            self.stored[resp["id"]] = {"request": body, "response": resp}
            self.upstream.replies[f"{PATH}/{resp['id']}"] = Reply(body=resp)
        if body.get("stream"):
            return stream_reply(stream_events(resp))
        return Reply(body=resp, headers={"x-request-id": "req_mock"})
