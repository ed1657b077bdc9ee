"""The admin API's door: ``{base_path}/admin/api/v1/...``, JSON in and out, for scripts and the dashboard.

Everything here is off the request path of the client endpoints: the gateway hands a request over only
when its path starts with ``/admin/``. The door authenticates (admin tokens, or forward auth), parses
the query and the bounded JSON body (unknown fields rejected with their path), finds the handler in
one table (:data:`ROUTES`, each resource module contributing its own rows) and answers every error
in the OpenAI shape, as the client endpoints do. A write (POST, PUT, PATCH, DELETE) must come from the
gateway's own origin or from a script, its body sent as JSON (:func:`same_origin`): with forward auth the
browser's cookie authenticates, and a page of another site must not be able to use it.

Handlers are plain async functions ``handler(req) -> Answer``; whatever touches sqlite runs in a thread
through :meth:`AdminRequest.db`, never on the event loop.

The dashboard (its page, files, login and logout: :mod:`.dashboard`) is the other door here, at
``{base_path}/admin/``; its session cookie opens this API like a token (:mod:`.auth`), every write made
with it carrying the CSRF header.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import logging
import re
import sqlite3
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote

from ..errors import (
    AdminDisabled,
    BadRequest,
    Conflict,
    Forbidden,
    GatewayError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
)
from ..logs import quote

if TYPE_CHECKING:
    from ..app import Gateway
    from ..context import RequestContext
    from ..http.server import Request, Responder
    from ..store.catalog import Catalog
    from .auth import Session

log = logging.getLogger("at_gateway.admin")

PREFIX = b"/admin/api/v1/"
_JSON_CT = (b"content-type", b"application/json")
_NO_STORE = (b"cache-control", b"no-store")  # admin answers may describe secrets' existence: never cached
#: On every answer of the admin API, errors included (a JSON or CSV answer opened in a browser tab, or framed by
#: another site, must be neither sniffed into HTML nor shown in a frame, nor its URL leaked as a Referer).
SECURITY_HEADERS: list[tuple[bytes, bytes]] = [
    (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]

DEFAULT_PAGE = 50
MAX_PAGE = 1000
MAX_CURSOR = 512  # characters: every cursor this API gives is far shorter (a JSON list of one to three values)

# Methods that change something: the ones a cross-site page must not be able to send with the user's cookie.
UNSAFE = frozenset((b"POST", b"PUT", b"PATCH", b"DELETE"))
# Sec-Fetch-Site values of requests a page of this origin made, or the user made (typed, bookmarked, curl).
_OWN_SITE = frozenset((b"same-origin", b"none"))
# Secret prefixes that are public knowledge (they name the vendor, not the key): mask() may show them.
PUBLIC_PREFIXES = ("sk-proj-", "sk-ant-", "sk-", "AIza", "atg_", "gsk_")
MASK_MIN = 20  # characters: a shorter secret is shown as the ellipsis alone


@dataclass
class Answer:
    """What a handler answers: a status and a JSON-able body; or, with ``raw``, those bytes as they are (their
    Content-Type among ``headers``: a CSV export)."""

    body: Any
    status: int = 200
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    raw: bytes | None = None


Handler = Callable[["AdminRequest"], Awaitable[Answer]]


class AdminRequest:
    """One admin request, as handlers see it: path parameters, query, body, the actor, the gateway."""

    def __init__(self, gateway: Gateway, request: Request, ctx: RequestContext, actor: str,
                 params: dict[str, str], query: dict[str, str], session: Session | None = None) -> None:
        self.gateway = gateway
        self.request = request
        self.ctx = ctx
        # "token0", "token1", ..., "session:token0" (the dashboard's cookie), or the forward-auth user
        # ("forward-auth:alice")
        self.actor = actor
        self.session = session  # the dashboard session the request came with; None: a token or forward auth
        self.params = params
        self.query = query
        self.method = request.method.decode("latin-1")

    # -- the parts the handlers use -----------------------------------------
    @property
    def catalog(self) -> Catalog:
        """The database's catalog (providers, routes, audit, keys' connection); 409 with an in-memory store."""
        catalog = getattr(self.gateway.services, "catalog", None)
        if catalog is None:
            raise Conflict("this needs a database file: the store is in memory (store.path: \":memory:\"); "
                           "set store.path (or state_dir) and restart", code="store_in_memory")
        return catalog

    async def db(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in a thread, one at a time per process, on the catalog's connection. A database that
        another connection keeps locked longer than the busy timeout is a 503 ``store_busy`` (retry), not a
        500: nothing was changed, and the same request succeeds once the other writer is done."""
        try:
            return await self.catalog.call(fn, *args)
        except sqlite3.OperationalError as exc:
            if is_busy(exc):
                raise store_busy() from None
            raise

    def json(self, allowed: Iterable[str] | None = None, required: Iterable[str] = (),
             what: str = "body") -> dict[str, Any]:
        """The body as a JSON object; 400 naming each unknown field (not in ``allowed``) and missing one."""
        raw = self.request.body
        if not raw.strip():
            if required:
                raise BadRequest(f"a JSON object body is required (with {', '.join(required)})", code="invalid_json")
            return {}
        body = self.gateway.decode_body(raw)
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object", code="invalid_json")
        problems = []
        if allowed is not None:
            allowed = set(allowed)
            problems += [f"{what}.{k}: unknown field (allowed: {', '.join(sorted(allowed))})"
                         for k in body if k not in allowed]
        problems += [f"{what}.{k}: required" for k in required if body.get(k) is None]
        if problems:
            raise invalid(problems)
        return body

    def q_str(self, name: str, default: str | None = None, choices: Iterable[str] | None = None) -> str | None:
        value = self.query.get(name, default)
        if value is not None and choices is not None and value not in set(choices):
            raise BadRequest(f"query parameter {name}: must be one of {', '.join(choices)}", code="invalid_query")
        return value

    def q_int(self, name: str, default: int | None = None, lo: int = 0, hi: int | None = None) -> int | None:
        value = self.query.get(name)
        if value is None:
            return default
        try:
            n = int(value)
        except ValueError:
            raise BadRequest(f"query parameter {name}: {quote(self.gateway.redact, value, 40)} is not a whole number",
                             code="invalid_query") from None
        if n < lo or (hi is not None and n > hi):
            raise BadRequest(f"query parameter {name}: {n} is out of range ({lo}..{hi if hi is not None else ''})",
                             code="invalid_query")
        return n

    def q_time(self, name: str) -> float | None:
        """A time as Unix seconds or ISO 8601 (``2026-12-01``, ``2026-12-01T10:00:00Z``); UTC when no zone."""
        value = self.query.get(name)
        if value is None:
            return None
        return parse_time(value, f"query parameter {name}", self.gateway.redact)

    def page(self) -> tuple[int, list[Any] | None]:
        """``limit`` (default 50, at most 1000) and the decoded ``cursor`` (None on the first page)."""
        limit = self.q_int("limit", DEFAULT_PAGE, 1, MAX_PAGE) or DEFAULT_PAGE
        cursor = self.query.get("cursor")
        return limit, (decode_cursor(cursor) if cursor else None)


def is_busy(exc: BaseException) -> bool:
    """Whether a sqlite error is "another connection holds the lock" (database is locked / busy)."""
    text = str(exc).lower()
    return isinstance(exc, sqlite3.OperationalError) and ("locked" in text or "busy" in text)


def store_busy(what: str = "nothing was changed") -> ServiceUnavailable:
    """503 ``store_busy`` with ``Retry-After: 1``: the database is locked by another writer for longer than the
    busy timeout (a long CLI command, another worker's rotation)."""
    return ServiceUnavailable(f"the database is busy (another process holds its write lock): {what}; retry in a "
                              "moment", code="store_busy", headers=[(b"retry-after", b"1")])


def parse_time(value: str, what: str, redact: Callable[[str], str] = str) -> float:
    try:
        return float(value)
    except ValueError:
        pass
    try:
        stamp = dt.datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise BadRequest(f"{what}: {quote(redact, value, 40)} is not a time (Unix seconds or ISO 8601, such as "
                         "2026-12-01T10:00:00Z)", code="invalid_query") from None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=dt.timezone.utc)
    return stamp.timestamp()


def invalid(problems: list[str], message: str | None = None) -> BadRequest:
    """400 listing every problem (each with its path) in the message and as ``error.problems``."""
    text = message or f"{len(problems)} problem(s): " + "; ".join(problems)
    return BadRequest(text, code="invalid_fields", extra={"problems": problems})


def encode_cursor(values: list[Any]) -> str:
    """An opaque cursor for the page after the row whose sort key is ``values``."""
    return base64.urlsafe_b64encode(json.dumps(values, separators=(",", ":")).encode()).decode().rstrip("=")


def decode_cursor(text: str) -> list[Any]:
    """The values a cursor of :func:`encode_cursor` holds; 400 for anything else. Bounded: a cursor longer
    than any this API gives is refused before it is decoded (a deeply nested JSON list would exhaust the
    parser's recursion)."""
    values: Any = None
    if len(text) <= MAX_CURSOR:
        try:
            values = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        except (ValueError, binascii.Error, RecursionError):
            values = None
    if not isinstance(values, list):
        raise BadRequest("query parameter cursor: not a cursor this API gave (use next_cursor as it came)",
                         code="invalid_query")
    return values


def listing(data: list[Any], next_values: list[Any] | None) -> dict[str, Any]:
    """A page: ``{"object": "list", "data": [...], "next_cursor": "..." | null}``."""
    return {"object": "list", "data": data,
            "next_cursor": encode_cursor(next_values) if next_values is not None else None}


def mask(secret: str | None) -> str | None:
    """A secret as admin reads show it: the ellipsis, and for a secret of 20 characters or more its last 4
    (``…abcd``) and a vendor prefix everyone knows (``sk-…abcd``, ``AIza…abcd``; :data:`PUBLIC_PREFIXES`).
    Nothing else of the head: a custom secret's first characters are part of the secret."""
    if not secret:
        return secret
    if len(secret) < MASK_MIN:
        return "…"
    head = next((p for p in PUBLIC_PREFIXES if secret.startswith(p)), "")
    return f"{head}…{secret[-4:]}"


_TOKEN_HOST = re.compile(rb"^[a-z][a-z0-9+.-]*://([^/?#]*)$")


def same_origin(request: Request) -> None:
    """Refuse a change a page of another site made the browser send (CSRF): with forward auth the user's
    cookie authenticates whatever their browser sends. 403 ``cross_site_request`` when the browser says
    the request is cross-site or same-site (a sibling host) in ``Sec-Fetch-Site``, or, from a browser that
    does not send it, when ``Origin`` names another host than ``Host`` (or ``X-Forwarded-Host``, for a
    proxy that rewrites Host: a page cannot set either). 415 ``unsupported_media_type`` for a body that is
    not ``application/json``: an HTML form can send ``text/plain`` cross-site without a preflight, never
    JSON. Scripts (curl, the SDKs) send neither header: only the content type applies to them."""
    site = request.header(b"sec-fetch-site")
    if site is not None:
        if site.strip().lower() not in _OWN_SITE:
            raise Forbidden("cross-site requests cannot change anything here (Sec-Fetch-Site: "
                            f"{site[:40].decode('latin-1')!r}): use the admin API from its own origin, or from a "
                            "script", code="cross_site_request")
    else:
        origin = request.header(b"origin")
        if origin is not None:
            m = _TOKEN_HOST.match(origin.strip().lower())
            hosts = {h.strip().lower() for h in (request.header(b"host"), request.header(b"x-forwarded-host"))
                     if h is not None}
            if m is None or m[1] not in {h.split(b",")[0].strip() for h in hosts}:
                raise Forbidden("cross-site requests cannot change anything here (the Origin is not this host): "
                                "use the admin API from its own origin, or from a script", code="cross_site_request")
    if request.body:
        ctype = request.header(b"content-type")
        media = (ctype or b"").split(b";")[0].strip().lower()
        if media != b"application/json":
            shown = repr(ctype[:60].decode("latin-1")) if ctype is not None else "none"
            raise GatewayError(f"the body must be JSON sent as Content-Type: application/json (got {shown}); with "
                               "curl: -H 'content-type: application/json'", status=415,
                               type="invalid_request_error", code="unsupported_media_type")


# -- the table --------------------------------------------------------------
Route = tuple[str, tuple[str, ...], Handler]  # (method, path pattern ("providers", "{name}"), handler)


def _table() -> list[Route]:
    """Every resource module's rows (imported here, once: the modules import this one for its helpers)."""
    from . import catalog, clients, dashboard, reports, stats, system

    return [*clients.ROUTES, *catalog.ROUTES, *reports.ROUTES, *system.ROUTES, *stats.ROUTES, *dashboard.ROUTES]


class AdminAPI:
    """The admin door of one :class:`~at_gateway.app.Gateway` (built with it; holds no state of its own)."""

    def __init__(self, gateway: Gateway, routes: list[Route] | None = None) -> None:
        self.gateway = gateway
        self.routes = routes if routes is not None else _table()
        from .auth import AdminAuth
        from .dashboard import Dashboard

        self.auth = AdminAuth(gateway.config.admin, gateway)
        self.dashboard = Dashboard(self)  # its files read now: serving reads nothing more from the package

    def match(self, method: str, parts: list[str]) -> tuple[Handler, dict[str, str]]:
        allowed: list[str] = []
        for m, pattern, handler in self.routes:
            if len(pattern) != len(parts):
                continue
            params: dict[str, str] = {}
            for want, got in zip(pattern, parts, strict=True):
                if want.startswith("{"):
                    params[want[1:-1]] = got
                elif want != got:
                    break
            else:
                if m == method:
                    return handler, params
                allowed.append(m)
        if allowed:
            raise MethodNotAllowed(f"{method} is not allowed here; use {', '.join(sorted(set(allowed)))}",
                                   headers=[(b"allow", ", ".join(sorted(set(allowed))).encode())])
        raise NotFound("no such admin endpoint: " + quote(self.gateway.redact, "/".join(parts), 200),
                       code="unknown_url")

    async def handle(self, ctx: RequestContext, request: Request, responder: Responder) -> None:
        """Answer one admin request (the path is below the base path, starting ``/admin/api/``); every answer,
        errors and the 500 of a bug included, with :data:`SECURITY_HEADERS` and ``Cache-Control: no-store``."""
        ctx.unlogged = True  # the audit log keeps what admins did; the request log is for clients
        try:
            await self._handle(ctx, request, responder)
        except GatewayError as exc:  # the gateway's error path sends exc.headers
            exc.headers = [*exc.headers, *SECURITY_HEADERS, _NO_STORE]
            raise
        except Exception as exc:
            from ..http.server import ClientGone

            if isinstance(exc, ClientGone) or responder.started:
                raise
            # A bug: logged here with its traceback, answered as the server would (500 internal_error), with the
            # headers the server's own answer would lack.
            log.exception("admin API %s %s failed", request.method.decode("latin-1"),
                          quote(self.gateway.redact, request.path.decode("latin-1"), 200))
            raise GatewayError("internal error", headers=[*SECURITY_HEADERS, _NO_STORE]) from None

    async def _handle(self, ctx: RequestContext, request: Request, responder: Responder) -> None:
        admin = self.gateway.config.admin
        if len(request.body) > admin.max_body_size:
            raise PayloadTooLarge(f"admin request bodies are limited to {admin.max_body_size} bytes "
                                  "(admin.max_body_size)")
        identity = await self.auth.authenticate(request)
        if request.method in UNSAFE:
            same_origin(request)
        if not request.path.startswith(PREFIX):  # /admin/api/v2/..., /admin/apix: after auth (no probing)
            raise NotFound("no such admin endpoint: " + quote(self.gateway.redact, request.path.decode("latin-1"), 200)
                           + f" (the admin API is under {self.gateway.config.base_path}/admin/api/v1/)",
                           code="unknown_url")
        parts = [unquote(p) for p in request.path[len(PREFIX):].decode("latin-1").split("/")]
        if parts and parts[-1] == "" and len(parts) > 1:
            parts.pop()  # a trailing slash
        handler, params = self.match(request.method.decode("latin-1"), parts)
        query: dict[str, str] = {}
        for k, v in parse_qsl(request.query.decode("latin-1"), keep_blank_values=True):
            if k in query:
                raise BadRequest(f"query parameter {k}: given more than once", code="invalid_query")
            query[k] = v
        answer = await handler(AdminRequest(self.gateway, request, ctx, identity.actor, params, query,
                                            identity.session))
        ctx.status = answer.status
        rid = (b"x-request-id", ctx.request_id.encode())
        if answer.raw is not None:
            await responder.send(answer.status, [_NO_STORE, *SECURITY_HEADERS, rid, *answer.headers], answer.raw)
            return
        body = json.dumps(answer.body, separators=(",", ":"), ensure_ascii=False).encode()
        await responder.send(answer.status, [_JSON_CT, _NO_STORE, *SECURITY_HEADERS, rid, *answer.headers], body)

    async def page(self, ctx: RequestContext, request: Request, responder: Responder) -> None:
        """The dashboard at ``{base_path}/admin/`` (its files, login, logout): see :mod:`.dashboard`."""
        ctx.unlogged = True
        await self.dashboard.serve(ctx, request, responder)


__all__ = ["PREFIX", "SECURITY_HEADERS", "AdminAPI", "AdminDisabled", "AdminRequest", "Answer", "Conflict", "invalid",
           "is_busy", "listing", "mask", "parse_time", "same_origin", "store_busy"]
