"""The admin API's door: ``{base_path}/admin/api/v1/...``, JSON in and out, for scripts and the dashboard.

Everything here is off the request path of the client endpoints: the gateway hands a request over only
when its path starts with ``/admin/``. The door authenticates (admin tokens, or forward auth), parses
the query and the bounded JSON body (unknown fields rejected with their path), finds the handler in
one table (:data:`ROUTES`, each resource module contributing its own rows) and answers every error
in the OpenAI shape, as the client endpoints do.

Handlers are plain async functions ``handler(req) -> Answer``; whatever touches sqlite runs in a thread
through :meth:`AdminRequest.db`, never on the event loop.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote

from ..errors import AdminDisabled, BadRequest, Conflict, MethodNotAllowed, NotFound, PayloadTooLarge
from ..logs import quote

if TYPE_CHECKING:
    from ..app import Gateway
    from ..context import RequestContext
    from ..http.server import Request, Responder
    from ..store.catalog import Catalog

log = logging.getLogger("at_gateway.admin")

PREFIX = b"/admin/api/v1/"
_JSON_CT = (b"content-type", b"application/json")
_NO_STORE = (b"cache-control", b"no-store")  # admin answers may describe secrets' existence: never cached

DEFAULT_PAGE = 50
MAX_PAGE = 1000


@dataclass
class Answer:
    """What a handler answers: a status and a JSON-able body."""

    body: Any
    status: int = 200
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


Handler = Callable[["AdminRequest"], Awaitable[Answer]]


class AdminRequest:
    """One admin request, as handlers see it: path parameters, query, body, the actor, the gateway."""

    def __init__(self, gateway: Gateway, request: Request, ctx: RequestContext, actor: str,
                 params: dict[str, str], query: dict[str, str]) -> None:
        self.gateway = gateway
        self.request = request
        self.ctx = ctx
        self.actor = actor  # "token0", "token1", ... or the forward-auth user ("forward-auth:alice")
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
        """``fn(*args)`` in a thread, one at a time per process, on the catalog's connection."""
        return await self.catalog.call(fn, *args)

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
    try:
        values = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except (ValueError, binascii.Error):
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
    """A secret as admin reads show it: its scheme-like prefix and at most its last 4 characters
    (``sk-…abcd``), and only the ellipsis when it is short enough for 4 characters to matter."""
    if not secret:
        return secret
    head = ""
    for sep in ("-", "_"):
        first, found, _ = secret.partition(sep)
        if found and 0 < len(first) <= 4 and first.isalnum():
            head = first + sep
            break
    tail = secret[-4:] if len(secret) >= 20 else ""
    return f"{head}…{tail}"


# -- the table --------------------------------------------------------------
Route = tuple[str, tuple[str, ...], Handler]  # (method, path pattern ("providers", "{name}"), handler)


def _table() -> list[Route]:
    """Every resource module's rows (imported here, once: the modules import this one for its helpers)."""
    from . import catalog, clients, reports, system

    return [*clients.ROUTES, *catalog.ROUTES, *reports.ROUTES, *system.ROUTES]


class AdminAPI:
    """The admin door of one :class:`~at_gateway.app.Gateway` (built with it; holds no state of its own)."""

    def __init__(self, gateway: Gateway, routes: list[Route] | None = None) -> None:
        self.gateway = gateway
        self.routes = routes if routes is not None else _table()
        from .auth import AdminAuth

        self.auth = AdminAuth(gateway.config.admin, gateway)

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
        """Answer one admin request (the path is below the base path, starting ``/admin/api/v1/``)."""
        ctx.unlogged = True  # the audit log keeps what admins did; the request log is for clients
        admin = self.gateway.config.admin
        if len(request.body) > admin.max_body_size:
            raise PayloadTooLarge(f"admin request bodies are limited to {admin.max_body_size} bytes "
                                  "(admin.max_body_size)")
        actor = await self.auth.check(request)
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
        answer = await handler(AdminRequest(self.gateway, request, ctx, actor, params, query))
        body = json.dumps(answer.body, separators=(",", ":"), ensure_ascii=False).encode()
        ctx.status = answer.status
        await responder.send(answer.status, [_JSON_CT, _NO_STORE, (b"x-request-id", ctx.request_id.encode()),
                                             *answer.headers], body)


__all__ = ["PREFIX", "AdminAPI", "AdminDisabled", "AdminRequest", "Answer", "Conflict", "invalid", "listing",
           "mask", "parse_time"]
