"""The contract every front door implements, and the parts they share.

A door is a client-facing API format (Anthropic Messages, OpenAI Responses, Gemini's generateContent,
embeddings, legacy completions), symmetric to a provider adapter: it turns its request into a
:class:`Call` (the internal form, an OpenAI chat body, plus the door's own body for steps that speak
the door's API natively), and each step's answer or stream back into its own format. Routing runs a
Call's steps exactly as it runs a chat request's (fallback, retries, keys, circuits, limits); only the
per-step send and the stream's end and error event come from the Call (see :class:`Router`).

Native passthrough: when a step's provider speaks the door's API (``Provider.native(op, step)``), the
door's body goes to it as the client sent it, only the model (and what the step changes) rewritten,
so nothing the internal form cannot carry (Anthropic ``cache_control``, thinking signatures, Gemini
thought signatures, Responses' built-in items) is lost. Every other pairing is translated.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ..config import Step
from ..errors import BadRequest, GatewayError
from ..http.pool import Headers
from ..providers.base import Completion, Provider, StreamState

if TYPE_CHECKING:
    from ..context import RequestContext
    from ..http.server import Request, Responder

_JSON_CT = (b"content-type", b"application/json")
SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]


_ENCODE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode  # built once: json.dumps with
# options builds an encoder per call, which is most of a small event's cost
_ENCODE_ASCII = json.JSONEncoder(separators=(",", ":")).encode


def dumps(obj: Any) -> bytes:
    """Compact JSON, UTF-8 (the encoding every door answers in). A lone surrogate (an upstream's JSON may escape
    one, and decoding keeps it) has no UTF-8 form: then the text goes out escaped, as the upstream had it."""
    try:
        return _ENCODE(obj).encode()
    except UnicodeEncodeError:
        return _ENCODE_ASCII(obj).encode()


def sse(name: str | None, obj: Any) -> bytes:
    """One SSE event: ``event: name`` (when the API names its events) and one ``data:`` line."""
    data = b"data: " + dumps(obj) + b"\n\n"
    return b"event: " + name.encode() + b"\n" + data if name else data


class StreamRenderer:
    """Turns one step's stream into the door's events, as it goes; one per opened stream.

    ``feed`` gets what the adapter yielded (for a translated step: one or more OpenAI
    ``chat.completion.chunk`` SSE events joined; for a native step: the door's own events) and returns the
    bytes for the client (``b""``: nothing yet). ``close`` is called once after the adapter's clean end and
    returns the door's closing events (Anthropic ``message_delta`` + ``message_stop``, Responses
    ``response.completed``). ``fail`` renders the gateway's error (``{"error": {"message", "type", "code",
    "status"}}``) as the door's error event, the last thing the client reads: a broken stream never ends
    with the door's normal end.
    """

    def feed(self, chunk: bytes) -> bytes:
        return chunk

    def close(self) -> bytes:
        return b""

    def fail(self, error: dict[str, Any]) -> bytes:
        raise NotImplementedError


class DoorStream:
    """An adapter's stream seen through a door's :class:`StreamRenderer`.

    Routing treats it as the adapter's own generator (its first item opens the stream, ``aclose`` ends
    it). After the adapter's clean end come the renderer's closing events: kept in ``tail`` for
    :meth:`Call.end`, which routing writes with the stream's end (one write and one relay round less per
    stream), or, when nothing went out yet (an empty answer), as the item that opens the stream. Routing
    asks for the end only after a clean end, so a stream cut before it gets ``fail`` instead.
    ``on_close(renderer)`` is awaited between the clean end and those closing events (the Responses door
    keeps the response there, so a follow-up finds it).
    """

    __slots__ = ("inner", "renderer", "on_close", "tail", "_sent", "_closed")

    def __init__(self, inner: AsyncIterator[bytes], renderer: StreamRenderer,
                 on_close: Callable[[Any], Awaitable[None]] | None = None) -> None:
        self.inner = inner
        self.renderer = renderer
        self.on_close = on_close
        self.tail = b""
        self._sent = False
        self._closed = False

    def __aiter__(self) -> DoorStream:
        return self

    async def __anext__(self) -> bytes:
        feed = self.renderer.feed
        while True:
            try:
                chunk = await self.inner.__anext__()
            except StopAsyncIteration:
                if self._closed:
                    raise
                self._closed = True
                tail = self.renderer.close()
                if self.on_close is not None:
                    await self.on_close(self.renderer)
                if tail and not self._sent:
                    self._sent = True
                    return tail
                self.tail = tail
                raise
            out = feed(chunk)
            if out:
                self._sent = True
                return out

    async def aclose(self) -> None:
        aclose = getattr(self.inner, "aclose", None)
        if aclose is not None:
            await aclose()


def json_object(request: Request, decode: Any) -> dict[str, Any]:
    """The body as a JSON object with a string ``model``: 400 ``invalid_json`` / ``missing_model`` (OpenAI's
    wording and ``param``) otherwise. The OpenAI-shaped doors (responses, embeddings, completions) start here."""
    body = decode(request.body)
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object", code="invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' is required and must be a string", code="missing_model", extra={"param": "model"})
    return body


class Call:
    """One request through a door: what the gateway and routing need from it.

    ``model``: the route name. ``chat``: the internal form (an OpenAI chat body; for embeddings and legacy
    completions the OpenAI body of that endpoint), which limits read and translated steps get.
    ``native``: the door's own body, for steps that speak the door's API (None: never native).
    ``headers``: client headers native steps get unchanged (``anthropic-beta``, ``anthropic-version``).
    """

    #: SSE comments allowed (keep-alives while the first chunk is awaited; the answering step's headers as a
    #: comment after an early head). A door whose clients choke on them turns them off.
    comments = True
    stream_headers = SSE_HEADERS  # the head of a streamed answer

    def __init__(self, door: Door, model: str, chat: dict[str, Any], *, native: dict[str, Any] | None = None,
                 stream: bool = False, headers: Headers | None = None) -> None:
        self.door = door
        self.model = model
        self.chat = chat
        self.native = native
        self.stream = stream
        self.headers: Headers = headers or []
        self.notes: list[str] = []  # what translation dropped (a warning header on the answer)

    # -- what routing calls per step --------------------------------------
    def is_native(self, adapter: Provider, step: Step) -> bool:
        op = self.door.native_op
        return self.native is not None and op is not None and adapter.native(op, step)

    def native_body(self, step: Step) -> dict[str, Any]:
        """The door's body for one native step: the model rewritten (Gemini carries it in the URL)."""
        body = dict(self.native or {})
        if "model" in body or self.door.model_in_body:
            body["model"] = step.model
        return body

    async def complete(self, adapter: Provider, prepared: dict[str, Any], step: Step) -> Completion:
        """One step's whole answer in the door's format (``prepared``: the chat body for this step)."""
        if self.is_native(adapter, step):
            assert self.door.native_op is not None
            return await adapter.send_native(self.door.native_op, self.native_body(step), step, self.headers)
        done = await adapter.complete(prepared, step)
        return Completion(self.door.render(self, done, step), done.usage)

    def open(self, adapter: Provider, prepared: dict[str, Any], step: Step, state: StreamState) -> DoorStream:
        """One step's stream in the door's events."""
        if self.is_native(adapter, step):
            assert self.door.native_op is not None
            inner = adapter.stream_native(self.door.native_op, self.native_body(step), step, state, self.headers)
            return DoorStream(inner, self.door.renderer(self, step, native=True))
        return DoorStream(adapter.stream(prepared, step, state), self.door.renderer(self, step, native=False))

    def end(self, agen: Any) -> bytes:
        """What ends a delivered stream after its clean end: the renderer's closing events (see DoorStream)."""
        return agen.tail if isinstance(agen, DoorStream) else b""

    def error(self, agen: Any, error: dict[str, Any]) -> bytes:
        """The door's error event: for the stream delivered (``agen``), or for none (every step failed after
        keep-alives sent the head)."""
        renderer = agen.renderer if isinstance(agen, DoorStream) else self.door.renderer(self, None, native=False)
        return renderer.fail(error)


class Door:
    """One client-facing API format. Built once per gateway; holds no per-request state."""

    name = "door"
    #: The provider operation that takes this door's body as it is (``Provider.native``); None: none does.
    native_op: str | None = None
    #: Whether the door's body names the model (Gemini's carries it in the URL).
    model_in_body = True
    #: Whether ``Call.chat`` is a chat body (a key's system prompt and max_tokens cap apply to it as to chat);
    #: False (embeddings, legacy completions): only the key's routes are checked, and :meth:`constrain` does
    #: the rest.
    chat_form = True
    #: Whether a key may come as ``x-goog-api-key`` or ``?key=`` (Gemini's ways) besides X-Api-Key and Bearer.
    google_keys = False
    content_type = _JSON_CT

    def __init__(self, config: Any) -> None:
        self.config = config

    def parse(self, request: Request, decode: Any) -> Call:
        """The request as a Call; BadRequest for a body the door's API would refuse. ``decode`` is the
        gateway's strict JSON decoder (depth, NaN, surrogates)."""
        raise NotImplementedError

    def render(self, call: Call, done: Completion, step: Step) -> bytes:
        """A translated step's chat completion (``done.body``, OpenAI bytes) as the door's answer."""
        raise NotImplementedError

    def renderer(self, call: Call, step: Step | None, native: bool) -> StreamRenderer:
        """A renderer for one stream (``native``: the step already speaks the door's events)."""
        raise NotImplementedError

    def error_body(self, exc: GatewayError) -> tuple[int, bytes]:
        """The status and body of an error answer, in the door's own error shape."""
        return exc.status, exc.to_body()

    def constrain(self, call: Call, system_prompt: str | None, max_tokens: int | None) -> None:
        """A client key's system prompt and max_tokens cap on the native body (the gateway applied them to
        ``call.chat`` already), so a native step cannot get around them."""

    async def serve(self, gateway: Any, ctx: RequestContext, request: Request, responder: Responder,
                    op: str) -> None:
        """Answer one request at this door (``op``: which of its endpoints). The default is the common
        flow: parse, then :meth:`Gateway.run_call` (route, key, limits, steps)."""
        call = self.parse(request, gateway.decode_body)
        await gateway.run_call(ctx, call, responder)

    async def finished(self, gateway: Any, ctx: RequestContext, call: Call, body: bytes) -> None:
        """After a whole answer was made, before it is sent (Responses keeps it for previous_response_id)."""
