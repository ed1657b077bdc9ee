"""``type: openai``: OpenAI and every OpenAI-compatible chat-completions API.

The client's body passes through (only ``model`` and the step's conflict
resolution change), and stream chunks are forwarded as the bytes received:
we decode only the first chunk (to check it is a chat completion chunk),
error events, and the final usage chunk.
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
from ..http.sse import EventSplitter, event_data, event_name
from .base import Completion, Provider, QuotedFailure, StreamState, config_headers, decode_event, read_error
from .presets import PRESETS  # `preset:` fills base_url for well-known services

_FINISH_RE = re.compile(rb'"finish_reason"\s*:\s*"([a-z_]+)"')
_USAGE_RE = re.compile(rb'"usage"\s*:\s*\{')


def validate_chat_completion(raw: bytes) -> dict[str, Any]:
    """Decode an upstream 2xx body and check it really is a chat completion."""
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
    if not isinstance(obj.get("choices"), list) or not obj["choices"]:
        raise StepFailed("upstream answered 2xx with a body that is not a chat completion (no choices)")
    return obj


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

    async def complete(self, body: dict[str, Any], step: Step) -> Completion:
        data = json.dumps(self.body_for(body, step), separators=(",", ":"), ensure_ascii=False).encode()
        async with self.client.stream(b"POST", self.url_for(step), self.headers, data, self.cfg.proxy) as resp:
            if not 200 <= resp.status < 300:
                raise await read_error(resp, self.name)
            raw = await resp.read()
        obj = validate_chat_completion(raw)
        return Completion(raw, obj.get("usage"))

    async def stream(self, body: dict[str, Any], step: Step, state: StreamState) -> AsyncIterator[bytes]:
        # Ask for usage always (accounting needs it); drop the usage-only
        # chunk again when the client did not ask for it.
        if self.stream_usage:
            opts = body.get("stream_options")
            body = {**body, "stream_options": {**(opts if isinstance(opts, dict) else {}), "include_usage": True}}
        strip_usage = not state.include_usage
        data = json.dumps(self.body_for(body, step), separators=(",", ":"), ensure_ascii=False).encode()
        async with self.client.stream(b"POST", self.url_for(step), self.stream_headers, data,
                                      self.cfg.proxy) as resp:
            if not 200 <= resp.status < 300:
                raise await read_error(resp, self.name)
            ctype = resp.header(b"content-type") or b""
            if b"text/event-stream" not in ctype:
                raw = await resp.read()
                validate_chat_completion(raw)  # raises for errors and garbage
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
                                _check_chunk(d, ev)
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


def _check_chunk(d: bytes, ev: bytes) -> None:
    obj = decode_event(d)
    err = obj.get("error")
    if err:
        msg = err.get("message") if isinstance(err, dict) else str(err)
        status = None
        if isinstance(err, dict) and isinstance(err.get("code"), int):
            status = err["code"]
        raise StepFailed(f"upstream stream error: {msg}", status=status, error=err if isinstance(err, dict) else None)
    if "choices" not in obj:
        raise StepFailed("upstream sent a stream event that is not a chat completion chunk")
