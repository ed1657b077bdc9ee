"""``type: openai``: OpenAI and every OpenAI-compatible chat-completions API.

The client's body passes through (only ``model`` and the step's conflict
resolution change), and stream chunks are forwarded as the bytes received:
we decode only the first chunk (to check it is a chat completion chunk),
error events, and the final usage chunk.

The same API's ``/embeddings`` and legacy ``/completions`` (the embeddings and
completions doors) pass through the same way: the body as sent with the
step's model, the answer's bytes as received, a legacy stream relayed by the
loop chat streams use (only its URL and what a chunk is called differ). A
large embeddings answer (``LARGE_ANSWER``) is not decoded on the event loop:
its shape is checked from its head and tail (see ``peek_embeddings``).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import struct
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import anyio.to_thread

from ..config import ProviderConfig, Step
from ..errors import StepFailed
from ..http.errors import UpstreamError
from ..http.pool import Headers, UpstreamClient
from ..http.sse import EventSplitter, event_data, event_name
from .base import Completion, Provider, QuotedFailure, StreamState, config_headers, decode_event, read_error
from .presets import PRESETS  # `preset:` fills base_url for well-known services

_FINISH_RE = re.compile(rb'"finish_reason"\s*:\s*"([a-z_]+)"')
_USAGE_RE = re.compile(rb'"usage"\s*:\s*\{')


def _answer_object(raw: bytes) -> dict[str, Any]:
    """An upstream 2xx body as a JSON object that is not an error (some APIs answer errors with 200)."""
    try:
        obj = json.loads(raw)
    except ValueError:
        raise QuotedFailure("upstream answered 2xx with a body that is not JSON", raw) from None
    if not isinstance(obj, dict):
        raise StepFailed("upstream answered 2xx with JSON that is not an object")
    if obj.get("error"):
        err = obj["error"]
        msg = err.get("message") if isinstance(err, dict) else str(err)
        raise StepFailed(f"upstream answered 2xx with an error: {msg}", error=err if isinstance(err, dict) else None)
    return obj


def validate_chat_completion(raw: bytes, what: str = "chat completion") -> dict[str, Any]:
    """Decode an upstream 2xx body and check it really is a chat completion (``what``: or a legacy
    ``text completion``, which has the same ``choices`` list)."""
    obj = _answer_object(raw)
    if not isinstance(obj.get("choices"), list) or not obj["choices"]:
        raise StepFailed(f"upstream answered 2xx with a body that is not a {what} (no choices)")
    return obj


def validate_embeddings(raw: bytes) -> dict[str, Any]:
    """Decode an upstream 2xx embeddings answer and check it is OpenAI's ``list`` (a ``data`` array)."""
    obj = _answer_object(raw)
    if not isinstance(obj.get("data"), list):
        raise StepFailed("upstream answered 2xx with a body that is not an embeddings list (no data)")
    return obj


# -- large embeddings answers ----------------------------------------------------------------------------------
# 2048 inputs of 1536 floats are a 40 MB answer: one json.loads of it takes 0.3 s and one json.dumps 0.8 s, and
# the event loop (every other request of the worker) waits that long. A worker thread alone does not help: a
# single C call such as json.loads holds the GIL from start to end, so the loop waits for it all the same.
# Above LARGE_ANSWER, an answer is therefore checked from its head and tail only when it is passed on, and
# decoded, converted and encoded in a worker thread in pieces (one array element per C call, well under a
# millisecond each), between which the loop gets the GIL back.

LARGE_ANSWER = 256 * 2**10  # bytes of JSON
_PEEK = 4096  # how much of a large answer's head and tail is read to check its shape
_RAW_DECODE = json.JSONDecoder().raw_decode
_ENCODE_PIECE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_WS = re.compile(r"[ \t\n\r]*")
_DATA_ARRAY = re.compile(rb'"data"\s*:\s*\[')
_USAGE_KEY = re.compile(rb'"usage"\s*:\s*')


def _skip(text: str, pos: int) -> int:
    """The index of the first character at or after ``pos`` that is not JSON whitespace."""
    m = _WS.match(text, pos)
    return m.end() if m is not None else pos


def _array_in_pieces(text: str, pos: int) -> tuple[list[Any], int]:
    """The JSON array starting at ``text[pos]`` (a ``[``), one element per decode; and the index after it."""
    out: list[Any] = []
    pos = _skip(text, pos + 1)
    if text.startswith("]", pos):
        return out, pos + 1
    while True:
        value, pos = _RAW_DECODE(text, pos)
        out.append(value)
        pos = _skip(text, pos)
        if text.startswith(",", pos):
            pos = _skip(text, pos + 1)
        elif text.startswith("]", pos):
            return out, pos + 1
        else:
            raise ValueError(f"expected ',' or ']' at character {pos}")


def loads_in_pieces(raw: bytes) -> Any:
    """``json.loads`` for a large answer, run in a worker thread: a top-level object's arrays (``data``,
    Google's ``embeddings``, ``predictions``) are decoded one element per call, so the thread never holds the
    GIL for long. Same result and the same ValueError for what is not JSON."""
    text = raw.decode(json.detect_encoding(raw), "surrogatepass")
    pos = _skip(text, 0)
    if not text.startswith("{", pos):
        return json.loads(text)
    obj: dict[str, Any] = {}
    pos = _skip(text, pos + 1)
    if text.startswith("}", pos):
        pos += 1
    else:
        while True:
            if not text.startswith('"', pos):
                raise ValueError(f"expected a key at character {pos}")
            key, pos = _RAW_DECODE(text, pos)
            pos = _skip(text, pos)
            if not text.startswith(":", pos):
                raise ValueError(f"expected ':' at character {pos}")
            pos = _skip(text, pos + 1)
            obj[key], pos = _array_in_pieces(text, pos) if text.startswith("[", pos) else _RAW_DECODE(text, pos)
            pos = _skip(text, pos)
            if text.startswith(",", pos):
                pos = _skip(text, pos + 1)
            elif text.startswith("}", pos):
                pos += 1
                break
            else:
                raise ValueError(f"expected ',' or '}}' at character {pos}")
    if _skip(text, pos) != len(text):
        raise ValueError(f"extra data at character {pos}")
    return obj


def dumps_in_pieces(obj: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON of an answer object, its top-level arrays encoded one element per call (see
    :func:`loads_in_pieces`), joined once."""
    out: list[bytes] = []
    for key, value in obj.items():
        out += (b"," if out else b"{", _ENCODE_PIECE(key).encode(), b":")
        if isinstance(value, list):
            out.append(b"[")
            for i, element in enumerate(value):
                if i:
                    out.append(b",")
                out.append(_ENCODE_PIECE(element).encode())
            out.append(b"]")
        else:
            out.append(_ENCODE_PIECE(value).encode())
    out.append(b"}" if out else b"{}")
    return b"".join(out)


def search_in_pieces(pattern: re.Pattern[bytes], data: bytes, window: int = 2**20) -> bool:
    """Whether ``pattern`` (a short one: at most 64 bytes a match) occurs in ``data``, searched a window at a
    time (one search over 40 MB holds the GIL some 20 ms)."""
    for start in range(0, len(data), window):
        if pattern.search(data, start, start + window + 64) is not None:
            return True
    return False


def _usage_at(raw: bytes, start: int, end: int) -> Any:
    """The JSON value after the ``"usage":`` key found in ``raw[start:end]`` (the last one), or None."""
    found = None
    for match in _USAGE_KEY.finditer(raw, start, end):
        found = match
    if found is None:
        return None
    try:
        return _RAW_DECODE(raw[found.end():found.end() + _PEEK].decode("utf-8"))[0]
    except ValueError:
        return None


def peek_embeddings(raw: bytes) -> tuple[bool, Any]:
    """Whether a large answer is shaped as OpenAI's embeddings ``list`` (an object with a ``data`` array, which
    OpenAI writes first, ending in ``}``), and its ``usage`` (which OpenAI writes last; None when not found
    there or before ``data``), read from its head and tail only."""
    head = raw[:_PEEK]
    data = _DATA_ARRAY.search(head)
    if data is None or not head.lstrip().startswith(b"{") or not raw[-_PEEK:].rstrip().endswith(b"}"):
        return False, None
    usage = _usage_at(raw, max(data.end(), len(raw) - _PEEK), len(raw))
    if usage is None:
        usage = _usage_at(raw, 0, data.start())
    return True, usage


def _validate_large_embeddings(raw: bytes) -> dict[str, Any]:
    try:
        obj = loads_in_pieces(raw)
    except ValueError:
        raise QuotedFailure("upstream answered 2xx with a body that is not JSON", raw[:_PEEK]) from None
    if not isinstance(obj, dict):
        raise StepFailed("upstream answered 2xx with JSON that is not an object")
    if obj.get("error"):
        err = obj["error"]
        msg = err.get("message") if isinstance(err, dict) else str(err)
        raise StepFailed(f"upstream answered 2xx with an error: {msg}", error=err if isinstance(err, dict) else None)
    if not isinstance(obj.get("data"), list):
        raise StepFailed("upstream answered 2xx with a body that is not an embeddings list (no data)")
    return obj


def embedding_base64(vector: list[Any]) -> str:
    """A vector in OpenAI's ``encoding_format: base64``: little-endian float32, base64 (what the openai SDK
    asks for by default and decodes with ``array("f")`` / ``numpy.frombuffer(dtype="float32")``)."""
    try:
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    except (struct.error, TypeError, OverflowError):
        raise StepFailed("upstream answered an embedding that is not a list of numbers") from None


def embedding_floats(data: str) -> list[float]:
    """A base64 embedding (little-endian float32) as floats, for a client that asked for ``float``."""
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise StepFailed("upstream answered a base64 embedding that is not valid base64") from None
    if len(raw) % 4:
        raise StepFailed("upstream answered a base64 embedding that is not a whole number of float32 values")
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def estimate_input_tokens(value: Any) -> int:
    """A guess of an embeddings ``input``'s tokens for an upstream that reports none: about 4 characters a
    token for text (as the limiter estimates prompts), the ids themselves for token arrays. Better than 0,
    which would make embeddings free for budgets and limits."""
    if isinstance(value, str):
        return len(value) // 4 + 1
    if isinstance(value, list):
        if value and all(isinstance(v, int) for v in value):
            return len(value)
        return sum(estimate_input_tokens(v) for v in value)
    return 0


class OpenAIProvider(Provider):
    type_name = "openai"

    def __init__(self, cfg: ProviderConfig, client: UpstreamClient) -> None:
        super().__init__(cfg, client)
        base = cfg.base_url or PRESETS.get(str(cfg.options.get("preset", "")), "")
        self.base = base.rstrip("/")  # the API root: /embeddings, /completions, /responses live beside chat
        self.url = self.base + "/chat/completions"
        configured = config_headers(cfg)  # the config's headers win over ours of the same name
        names = {name for name, _ in configured}
        ours = [(b"content-type", b"application/json"), *self.auth_headers()]
        headers = [h for h in ours if h[0] not in names] + configured
        self.stream_headers = [*headers, (b"accept", b"text/event-stream")]
        self.headers = [*headers, (b"accept", b"application/json")]
        # Streams ask for usage (accounting needs it) unless the API refuses stream_options.
        self.stream_usage = cfg.options.get("stream_usage", True) is not False

    def auth_headers(self) -> Headers:
        """How this API takes its key (Azure overrides: ``api-key``)."""
        return [(b"authorization", b"Bearer " + self.cfg.api_key.encode())] if self.cfg.api_key else []

    def url_for(self, step: Step) -> str:
        """The endpoint for a step (Azure puts the step's deployment in the path)."""
        return self.url

    def body_for(self, body: dict[str, Any], step: Step) -> dict[str, Any]:
        """The body as this API wants it (Azure drops ``model``)."""
        return body

    def endpoint(self, step: Step, path: str) -> str:
        """The URL of this API's other endpoints (``embeddings``, ``completions``) for a step (Azure: under
        the step's deployment)."""
        return f"{self.base}/{path}"

    async def _post_json(self, url: str, body: dict[str, Any], step: Step) -> bytes:
        """POST ``body`` (as this API wants it); the 2xx answer's bytes, StepFailed for any other status."""
        data = json.dumps(self.body_for(body, step), separators=(",", ":"), ensure_ascii=False).encode()
        async with self.client.stream(b"POST", url, self.headers, data, self.cfg.proxy) as resp:
            if not 200 <= resp.status < 300:
                raise await read_error(resp, self.name)
            return await resp.read()

    async def embed(self, body: dict[str, Any], step: Step) -> Completion:
        """``POST /embeddings`` with the client's body (token-id inputs, ``encoding_format``, ``dimensions``,
        ``user`` and any extension such as ``input_type`` as sent); the answer's bytes as received."""
        raw = await self._post_json(self.endpoint(step, "embeddings"), body, step)
        if len(raw) < LARGE_ANSWER:
            usage = validate_embeddings(raw).get("usage")
        else:  # not decoded on the loop (see LARGE_ANSWER): its shape from the head, its usage from the tail
            shaped, usage = peek_embeddings(raw)
            if not shaped:
                usage = (await anyio.to_thread.run_sync(_validate_large_embeddings, raw)).get("usage")
        return Completion(raw, usage if isinstance(usage, dict) else None)

    async def complete_text(self, body: dict[str, Any], step: Step) -> Completion:
        """``POST /completions`` (legacy) with the client's body; the ``text_completion`` as received."""
        raw = await self._post_json(self.endpoint(step, "completions"), body, step)
        usage = validate_chat_completion(raw, "text completion").get("usage")
        return Completion(raw, usage if isinstance(usage, dict) else None)

    def stream_text(self, body: dict[str, Any], step: Step, state: StreamState) -> AsyncIterator[bytes]:
        """A legacy completions stream: the upstream's events relayed as chat chunks are (:meth:`_relay`)."""
        return self._relay(self.endpoint(step, "completions"), body, step, state, "text completion")

    async def complete(self, body: dict[str, Any], step: Step) -> Completion:
        data = json.dumps(self.body_for(body, step), separators=(",", ":"), ensure_ascii=False).encode()
        async with self.client.stream(b"POST", self.url_for(step), self.headers, data, self.cfg.proxy) as resp:
            if not 200 <= resp.status < 300:
                raise await read_error(resp, self.name)
            raw = await resp.read()
        obj = validate_chat_completion(raw)
        return Completion(raw, obj.get("usage"))

    def stream(self, body: dict[str, Any], step: Step, state: StreamState) -> AsyncIterator[bytes]:
        # A plain method handing out the relay generator: no wrapping generator frame per chunk.
        return self._relay(self.url_for(step), body, step, state, "chat completion")

    async def _relay(self, url: str, body: dict[str, Any], step: Step, state: StreamState,
                     what: str) -> AsyncGenerator[bytes, None]:
        """An OpenAI-style SSE stream from ``url`` (chat chunks, or legacy ``text_completion`` events: ``what``
        names them in errors), relayed as received; no ``[DONE]`` (routing or the door adds the end)."""
        # Ask for usage always (accounting needs it); drop the usage-only
        # chunk again when the client did not ask for it.
        if self.stream_usage:
            opts = body.get("stream_options")
            body = {**body, "stream_options": {**(opts if isinstance(opts, dict) else {}), "include_usage": True}}
        strip_usage = not state.include_usage
        data = json.dumps(self.body_for(body, step), separators=(",", ":"), ensure_ascii=False).encode()
        async with self.client.stream(b"POST", url, self.stream_headers, data, self.cfg.proxy) as resp:
            if not 200 <= resp.status < 300:
                raise await read_error(resp, self.name)
            ctype = resp.header(b"content-type") or b""
            if b"text/event-stream" not in ctype:
                raw = await resp.read()
                validate_chat_completion(raw, what)  # raises for errors and garbage
                raise StepFailed(f"upstream did not stream (content-type {ctype.decode('latin-1')!r})")
            splitter = EventSplitter()
            first = True
            done = False
            try:
                async for chunk in resp.aiter_raw():
                    events = splitter.feed(chunk)
                    if not events or done:
                        continue
                    out: list[bytes] = []
                    try:
                        for ev in events:
                            d = event_data(ev)
                            if d is None:
                                continue  # comments and keep-alives
                            if d == b"[DONE]":
                                done = True
                                break
                            if first or b'"error"' in d or (b"event:" in ev and event_name(ev) == b"error"):
                                _check_chunk(d, what)
                                first = False
                            if b'"usage"' in d and _USAGE_RE.search(d):  # only the usage chunk is decoded
                                obj = decode_event(d)
                                if isinstance(obj.get("usage"), dict):
                                    state.usage = obj["usage"]
                                if strip_usage and not obj.get("choices"):
                                    continue
                            m = _FINISH_RE.search(d)
                            if m:
                                state.finish_reason = m.group(1).decode()
                            out.append(ev if ev.startswith(b"data: ") else b"data: " + d + b"\n\n")
                    except StepFailed:
                        if out:  # chunks that arrived together with the error reach the client first
                            yield b"".join(out)
                        raise
                    if out:
                        yield out[0] if len(out) == 1 else b"".join(out)
            except UpstreamError:
                if not done:
                    raise
                # After [DONE] the answer is whole: a connection that breaks while its end is read
                # is only not reused, never a broken stream.
            if not done and state.finish_reason is None:
                if first:
                    raise StepFailed("upstream stream ended before its first chunk")
                raise StepFailed("upstream stream ended before it was complete")


def _check_chunk(d: bytes, what: str = "chat completion") -> None:
    obj = decode_event(d)
    err = obj.get("error")
    if err:
        msg = err.get("message") if isinstance(err, dict) else str(err)
        status = None
        if isinstance(err, dict) and isinstance(err.get("code"), int):
            status = err["code"]
        raise StepFailed(f"upstream stream error: {msg}", status=status, error=err if isinstance(err, dict) else None)
    if "choices" not in obj:
        raise StepFailed(f"upstream sent a stream event that is not a {what} chunk")
