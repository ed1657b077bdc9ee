"""The per-request context: who is asking, what was tried, what it cost.

Everything later features need (client identity for keys and quotas, the
attempts for logs and metrics, usage for accounting) travels here, so the
request path passes one object instead of growing arguments.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Attempt:
    step: int
    provider: str
    model: str
    status: int | None = None
    error: str | None = None
    timeout: bool = False
    ok: bool = False
    upstream_error: dict[str, Any] | None = None
    key: int | None = None  # which of the provider's keys (when it has several)
    skipped: bool = False  # no request went out (circuit open, every key resting)
    cooling: float | None = None  # seconds the key (or every key) rests after this attempt's 429
    rate_limited: bool = False  # skipped because every key rests, and for 429s (not for failures in a row)

    def public(self) -> dict[str, Any]:
        out = {"step": self.step, "provider": self.provider, "model": self.model,
               "status": self.status, "error": self.error}
        if self.key is not None:
            out["key"] = self.key
        return out


@dataclass(slots=True)
class RequestContext:
    request_id: str
    method: str = ""
    path: str = ""
    client: str = ""  # identity of the calling key (never the key itself)
    route: str | None = None
    provider: str | None = None
    model: str | None = None
    stream: bool = False
    status: int = 0  # what the client got (a stream whose head went out is a 200, whatever followed)
    outcome: int | None = None  # the status that would have been answered, when the client got 200 and an error event
    attempts: list[Attempt] = field(default_factory=list)
    usage: dict[str, Any] | None = None
    error: str | None = None
    started: float = field(default_factory=time.perf_counter)
    first_byte: float | None = None
    key: Any = None  # the store's ClientKey of the caller; None for the config's operator keys
    admission: Any = None  # the limiter's record of this request (its reservation), settled in finish
    extra_headers: list[tuple[bytes, bytes]] = field(default_factory=list)  # e.g. x-ratelimit-*, on every answer
    cost_nanousd: int | None = None  # None: unpriced (or no usage)
    unlogged: bool = False  # kept out of the request log (admin API calls: the audit log has those)
    door: Any = None  # the front door (at_gateway.doors) it came in by; None: chat completions (or no door)
    limited: str | None = None  # which limit refused it (rpm, tpm, budget, ...), for metrics

    def gateway_headers(self) -> list[tuple[bytes, bytes]]:
        h = [(b"x-request-id", self.request_id.encode()), *self.extra_headers]
        if self.route is not None:
            h.append((b"x-gateway-route", self.route.encode()))
        if self.provider is not None:
            h.append((b"x-gateway-provider", self.provider.encode()))
        if self.model is not None:
            h.append((b"x-gateway-model", self.model.encode()))
        if self.attempts:
            h.append((b"x-gateway-attempts", str(len(self.attempts)).encode()))
        return h

    def early_headers(self) -> list[tuple[bytes, bytes]]:
        """The gateway headers of a head that goes out before a step answered (a stream's keep-alive):
        only what cannot turn out false. The answering step follows as :meth:`step_comment`."""
        h = [(b"x-request-id", self.request_id.encode()), *self.extra_headers]
        if self.route is not None:
            h.append((b"x-gateway-route", self.route.encode()))
        return h

    def step_comment(self) -> bytes:
        """The step headers an early head left out, as one SSE comment block in header syntax.

        Comment lines (``:`` first) are ignored by SSE clients and SDKs; provider and model names are
        checked at config load to hold no control characters, so they cannot break the framing.
        """
        return b": x-gateway-provider: %s\n: x-gateway-model: %s\n: x-gateway-attempts: %d\n\n" % (
            (self.provider or "").encode(), (self.model or "").encode(), len(self.attempts))
