"""CORS for browser clients of the client endpoints (chat, models, health), never the admin API.

Off unless ``cors.allow_origins`` is configured; the gateway then builds one :class:`CORSPolicy` at
start-up with every header list precomputed, so a cross-origin request costs one set lookup and one
small list. Which paths get CORS is decided by the gateway's table of client endpoints (see
``Gateway._endpoint``): a path outside it, an admin path above all, never gets these headers.

Decisions: a preflight (``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``) needs no key
(browsers send none) and is answered 204; from an origin not allowed it is answered 403 with an error
body and no ``Access-Control-*`` header, so the browser refuses and the network panel says why.
Actual answers (errors and streams included) from an allowed origin carry ``Access-Control-Allow-Origin``
(the origin echoed, or ``*`` for ``allow_origins: ["*"]`` without credentials),
``Access-Control-Expose-Headers`` and, with ``allow_credentials``, ``Access-Control-Allow-Credentials``.
Every answer to a request with an ``Origin`` carries ``Vary: Origin``, since the headers depend on it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import cast

from .config import CORSConfig
from .http.server import Headers, Responder

_ACAO = b"access-control-allow-origin"
_ACAH = b"access-control-allow-headers"
_VARY = (b"vary", b"Origin")
_VARY_PREFLIGHT = (b"vary", b"Origin, Access-Control-Request-Headers")
# A preflight's Access-Control-Request-Headers: a list of header names (Fetch: lower case, sorted, comma-joined).
_HEADER_LIST = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+(?:[ \t]*,[ \t]*[-!#$%&'*+.^_`|~0-9A-Za-z]+)*")
_MAX_HEADER_LIST = 4096


class CORSPolicy:
    """The configured policy, with every header list it can answer built once."""

    def __init__(self, cfg: CORSConfig, method_sets: Iterable[bytes]) -> None:
        self.any_origin = "*" in cfg.allow_origins  # config refuses "*" together with credentials
        # Browsers send the origin serialised in lower case; config may spell it otherwise.
        self._origins = frozenset(o.lower().encode() for o in cfg.allow_origins if o != "*")
        common: Headers = []
        if cfg.allow_credentials:
            common.append((b"access-control-allow-credentials", b"true"))
        actual = list(common)
        if cfg.expose_headers:
            actual.append((b"access-control-expose-headers", ", ".join(cfg.expose_headers).encode()))
        actual.append(_VARY)
        self._actual = actual
        self._actual_any: Headers = [(_ACAO, b"*"), *actual]
        self.vary_only: Headers = [_VARY]
        self._preflight: dict[bytes, Headers] = {}
        self._echo_headers = cfg.allow_headers is None
        allow_headers = list(cfg.allow_headers or ())
        if "*" in allow_headers and "authorization" not in allow_headers:
            allow_headers.append("authorization")  # Fetch: the wildcard never covers Authorization
        for methods in method_sets:
            h = [*common, (b"access-control-allow-methods", methods)]
            if allow_headers:
                h.append((_ACAH, ", ".join(allow_headers).encode()))
            h += [(b"access-control-max-age", str(cfg.max_age).encode()),
                  _VARY_PREFLIGHT if self._echo_headers else _VARY]
            self._preflight[methods] = h

    def _allow_origin(self, origin: bytes) -> bytes | None:
        """The Access-Control-Allow-Origin value for this origin, None when it is not allowed."""
        if self.any_origin:
            return b"*"
        if origin.lower() in self._origins:
            return origin  # as the browser spelt it: it compares byte for byte
        return None

    def actual_headers(self, origin: bytes | None) -> Headers:
        """Headers to add to an actual answer for a request from ``origin`` (None: sent no Origin)."""
        if origin is None:
            return self.vary_only
        if self.any_origin:
            return self._actual_any
        allowed = self._allow_origin(origin)
        if allowed is None:
            return self.vary_only
        return [(_ACAO, allowed), *self._actual]

    def preflight_headers(self, origin: bytes, methods: bytes, requested: bytes | None = None) -> Headers | None:
        """Headers of a 204 preflight answer for an endpoint allowing ``methods``; None: origin not allowed.

        Without ``allow_headers`` configured, the names the preflight asks for (``requested``) are allowed
        as asked, when they are a well-formed list of names; a malformed list is not echoed.
        """
        allowed = self._allow_origin(origin)
        if allowed is None:
            return None
        headers = [(_ACAO, allowed), *self._preflight[methods]]
        if self._echo_headers and requested and len(requested) <= _MAX_HEADER_LIST:
            requested = requested.strip(b" \t")
            if _HEADER_LIST.fullmatch(requested) is not None:
                headers.append((_ACAH, requested.lower()))
        return headers

    def wrap(self, responder: Responder, origin: bytes | None) -> Responder:
        """``responder`` with this origin's CORS headers appended to whatever head it sends.

        Routing starts SSE answers itself, so the headers go in here rather than at each call site.
        """
        return cast(Responder, CORSResponder(responder, self.actual_headers(origin)))


class CORSResponder:
    """Duck-types :class:`Responder`: appends fixed headers to the head of whole and streamed answers."""

    __slots__ = ("_inner", "_extra", "write", "end")

    def __init__(self, inner: Responder, extra: Headers) -> None:
        self._inner = inner
        self._extra = extra
        self.write = inner.write
        self.end = inner.end

    @property
    def started(self) -> bool:
        return self._inner.started

    @property
    def finished(self) -> bool:
        return self._inner.finished

    @property
    def status(self) -> int:
        return self._inner.status

    async def send(self, status: int, headers: Headers, body: bytes) -> None:
        await self._inner.send(status, [*headers, *self._extra], body)

    async def send_json(self, status: int, body: bytes, headers: Headers | None = None) -> None:
        await self._inner.send_json(status, body, [*(headers or ()), *self._extra])

    async def start(self, status: int, headers: Headers) -> None:
        await self._inner.start(status, [*headers, *self._extra])
