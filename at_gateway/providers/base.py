"""The adapter contract every provider type implements.

``complete`` returns one OpenAI ``chat.completion`` (as bytes, plus its usage
for accounting). ``stream`` is an async generator of SSE-framed OpenAI
``chat.completion.chunk`` events (several may come joined in one bytes
object, to be written together); it never yields ``[DONE]`` (routing adds it)
and raises :class:`StepFailed` for anything that is not a clean end, so a
broken stream can never look like a finished one.

Adapters must not yield inside a cancel scope or task group: routing applies
timeouts around each ``__anext__`` and closes the generator explicitly.

Adapters never cut an upstream's text to quote it: they do not know the
secrets, and a cut made before redaction can split a key so that its start
leaks. A failure that quotes upstream bytes is a :class:`QuotedFailure`
carrying them whole; routing redacts them whole and only then shortens them.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ..config import ProviderConfig, Step
from ..errors import StepFailed
from ..http.errors import UpstreamError
from ..http.pool import Headers, UpstreamClient


@dataclass
class Completion:
    body: bytes
    usage: dict[str, Any] | None = None


@dataclass
class StreamState:
    """What routing needs to know about a stream as it goes."""

    include_usage: bool = False  # the client asked for a usage chunk
    usage: dict[str, Any] | None = None
    finish_reason: str | None = None


class Provider:
    """One configured provider. Built once at start-up; shared by all requests."""

    type_name = "base"

    def __init__(self, cfg: ProviderConfig, client: UpstreamClient) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.client = client

    async def complete(self, body: dict[str, Any], step: Step) -> Completion:
        raise NotImplementedError

    def stream(self, body: dict[str, Any], step: Step, state: StreamState) -> AsyncIterator[bytes]:
        raise NotImplementedError

    async def aclose(self) -> None:
        """Release anything the provider holds (token caches, ...)."""

    # -- what front doors ask of a provider (see at_gateway/doors/base.py) ----------------------
    def native(self, op: str, step: Step) -> bool:
        """Whether this provider takes a door's own body for ``op`` as it is (``anthropic.messages``,
        ``anthropic.count_tokens``, ``gemini.generate``, ``gemini.count_tokens``, ``responses``)."""
        return False

    async def send_native(self, op: str, body: dict[str, Any], step: Step, headers: Headers) -> Completion:
        """``op`` with the door's body (model already rewritten); the answer's bytes in the door's format and
        its usage in OpenAI's form (``prompt_tokens``, ``completion_tokens``, ... for accounting).
        ``headers``: client headers to pass on (``anthropic-beta``)."""
        raise StepFailed(f"provider type {self.type_name!r} does not speak {op}", status=400)

    def stream_native(self, op: str, body: dict[str, Any], step: Step, state: StreamState,
                      headers: Headers) -> AsyncIterator[bytes]:
        """``op`` streamed: the upstream's SSE events in the door's format, passed on as they come;
        ``state.usage`` (OpenAI form) and ``state.finish_reason`` filled as they are known; StepFailed for
        an error event or an end before the API's own end, like :meth:`stream`."""
        raise StepFailed(f"provider type {self.type_name!r} does not speak {op}", status=400)

    async def embed(self, body: dict[str, Any], step: Step) -> Completion:
        """An OpenAI embeddings request (``model`` already the step's); an OpenAI ``list`` of embeddings back."""
        raise StepFailed(f"provider type {self.type_name!r} does not serve embeddings", status=400)

    async def complete_text(self, body: dict[str, Any], step: Step) -> Completion:
        """A legacy ``/v1/completions`` request, passed through (OpenAI-compatible APIs only)."""
        raise StepFailed(f"provider type {self.type_name!r} does not serve legacy completions "
                         "(/v1/completions)", status=400)

    def stream_text(self, body: dict[str, Any], step: Step, state: StreamState) -> AsyncIterator[bytes]:
        """A legacy completions stream: the upstream's ``text_completion`` events as they come, no ``[DONE]``."""
        raise StepFailed(f"provider type {self.type_name!r} does not serve legacy completions "
                         "(/v1/completions)", status=400)


class QuotedFailure(StepFailed):
    """A failed step that quotes an upstream's own bytes (``quoted``), kept whole and not yet redacted.

    ``message`` holds only the gateway's words; routing appends the quoted text once it has
    redacted the whole of it and shortened it (``logs.quote``). ``QuotedFailure(message)`` alone
    must stay valid: ``copy.copy`` rebuilds an exception from its message.
    """

    def __init__(self, message: str, quoted: bytes | str = b"", *, status: int | None = None,
                 timeout: bool = False, error: dict[str, Any] | None = None) -> None:
        super().__init__(message, status=status, timeout=timeout, error=error)
        self.quoted = quoted


def error_from_body(status: int, data: bytes, provider: str) -> StepFailed:
    """A failed step from an upstream error answer, keeping its message."""
    message = ""
    error_obj: dict[str, Any] | None = None
    try:
        obj = json.loads(data)
    except ValueError:
        obj = None
    if isinstance(obj, dict):
        err = obj.get("error")
        if isinstance(err, dict):
            error_obj = err
            message = str(err.get("message") or err.get("type") or "")
        elif isinstance(err, str):
            message = err
        elif isinstance(obj.get("message"), str):
            message = obj["message"]
    elif isinstance(obj, list) and obj and isinstance(obj[0], dict) and isinstance(obj[0].get("error"), dict):
        error_obj = obj[0]["error"]
        message = str(error_obj.get("message", ""))
    if not message:
        if not data.strip():
            return StepFailed(f"HTTP {status}: (empty body)", status=status, error=error_obj)
        return QuotedFailure(f"HTTP {status}", data.strip(), status=status, error=error_obj)
    return StepFailed(f"HTTP {status}: {message}", status=status, error=error_obj)


def decode_event(d: bytes, who: str = "upstream") -> dict[str, Any]:
    """One stream event's JSON object; anything else is a broken stream (StepFailed, never a bare ValueError)."""
    try:
        obj = json.loads(d)
    except ValueError:
        raise QuotedFailure(f"{who} sent a stream event that is not JSON", d) from None
    if not isinstance(obj, dict):
        raise StepFailed(f"{who} sent a stream event that is not a JSON object")
    return obj


async def read_bounded(resp: Any, limit: int = 65536) -> bytes:
    """At most ``limit`` bytes of a body (error bodies: enough to quote, never unbounded)."""
    parts: list[bytes] = []
    size = 0
    try:
        async for chunk in resp.aiter_raw():
            parts.append(chunk)
            size += len(chunk)
            if size >= limit:
                break
    except UpstreamError:
        pass
    return b"".join(parts)[:limit]


async def read_error(resp: Any, provider: str, limit: int = 65536) -> StepFailed:
    """Read (a bounded part of) an error body and turn it into StepFailed."""
    return with_retry_after(error_from_body(resp.status, await read_bounded(resp, limit), provider), resp)


def with_retry_after(failure: StepFailed, resp: Any) -> StepFailed:
    """``failure`` with the wait its answer asked for (Retry-After, retry-after-ms, x-ratelimit-reset-*): what
    cools the key and times a retry (see :mod:`at_gateway.resilience`)."""
    from ..resilience.backoff import retry_after

    failure.retry_after = retry_after(resp.headers)
    return failure


def config_headers(cfg: ProviderConfig) -> Headers:
    return [(k.lower().encode(), v.encode()) for k, v in cfg.headers.items()]
