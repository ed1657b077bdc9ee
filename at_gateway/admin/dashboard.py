"""The dashboard's server side at ``{base_path}/admin/``: the page's files, login and logout, and ``GET session``.

The page itself (``static/``: HTML, JS, CSS, no build step, no other host) is served from the package, read
once when the gateway is built, through :mod:`importlib.resources`, so that it works the same from a
checkout, a wheel and the ``.pyz`` zipapp (and nothing is read from a package a deploy may be replacing
under a draining process). Only names found there are served: a request's path is looked up as it came,
never joined to a directory, so ``..`` and its encodings find nothing (404).

Every answer here carries a strict Content-Security-Policy (no inline script or style, nothing from another
host), ``X-Frame-Options: DENY``, ``X-Content-Type-Options: nosniff`` and ``Referrer-Policy: no-referrer``;
HTML is ``no-store``, the other files ``no-cache`` with an ETag (revalidated, 304 when unchanged).

``POST login`` exchanges an admin token for the session cookies (see :mod:`.auth` for what they hold and why);
failed logins are limited per client address (``auth.LOGIN_FAILURES`` a minute, then 429 with Retry-After,
also for the right token: the limit must hold whatever the attacker guesses), counted together with wrong
admin tokens sent as Bearer to the admin API and wrong credentials on ``/metrics``. The address is the TCP
peer's: behind a reverse proxy every user shares the proxy's, so one user's wrong guesses lock all of them out
for the window (see :class:`.auth.AdminState`). With ``workers > 1`` and an in-memory store there is no login
(409 ``sessions_need_a_store``): a logout could not reach the other workers. ``POST logout`` revokes the
session in every worker and clears both cookies. Both are answered 204 and refused cross-site (the admin
API's :func:`~.api.same_origin`); SameSite=Strict keeps the browser from sending the cookie from another
site anyway.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import BadRequest, Forbidden, GatewayError, MethodNotAllowed, NotFound, PayloadTooLarge, Unauthorized
from ..logs import quote
from .api import AdminRequest, Answer, Route, invalid, same_origin
from .auth import (
    CSRF_COOKIE,
    SESSION_COOKIE,
    Session,
    client_address,
    cookies,
    process_state,
    sessions_need_a_store,
)

if TYPE_CHECKING:
    from importlib.abc import Traversable

    from ..context import RequestContext
    from ..http.server import Request, Responder
    from .api import AdminAPI

log = logging.getLogger("at_gateway.admin")

Headers = list[tuple[bytes, bytes]]

CSP = (b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       b"font-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
#: On every answer of the page's door (files, redirects, login, logout, errors).
SECURITY_HEADERS: Headers = [
    (b"content-security-policy", CSP),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]
_NO_STORE = (b"cache-control", b"no-store")
_NO_CACHE = (b"cache-control", b"no-cache")
_GET = frozenset((b"GET", b"HEAD"))
CONTENT_TYPES = {
    ".html": b"text/html; charset=utf-8", ".js": b"text/javascript; charset=utf-8",
    ".mjs": b"text/javascript; charset=utf-8", ".css": b"text/css; charset=utf-8",
    ".svg": b"image/svg+xml", ".png": b"image/png", ".ico": b"image/x-icon", ".webp": b"image/webp",
    ".json": b"application/json", ".map": b"application/json", ".txt": b"text/plain; charset=utf-8",
    ".woff2": b"font/woff2", ".woff": b"font/woff", ".webmanifest": b"application/manifest+json",
}
_OCTETS = b"application/octet-stream"
_MAX_DEPTH = 4  # folders below static/ that are served
STATIC_PACKAGE = "at_gateway.admin"
STATIC_FOLDER = "static"


@dataclass(frozen=True)
class StaticFile:
    body: bytes
    content_type: bytes
    etag: bytes

    @property
    def html(self) -> bool:
        return self.content_type.startswith(b"text/html")


def load_files(package: str = STATIC_PACKAGE, folder: str = STATIC_FOLDER) -> dict[str, StaticFile]:
    """Every file below ``folder`` of ``package`` by its path there (``app.js``, ``icons/x.svg``), read now; dot
    files and folders are left out. Through importlib.resources: a directory, a wheel's, or a zip's."""
    try:
        root = importlib.resources.files(package).joinpath(folder)
    except (ModuleNotFoundError, TypeError):
        return {}
    files: dict[str, StaticFile] = {}

    def walk(node: Traversable, prefix: str, depth: int) -> None:
        for entry in sorted(node.iterdir(), key=lambda e: e.name):
            if entry.name.startswith(".") or entry.name == "__pycache__":
                continue
            if entry.is_dir():
                if depth < _MAX_DEPTH:
                    walk(entry, f"{prefix}{entry.name}/", depth + 1)
            elif entry.is_file():
                body = entry.read_bytes()
                dot = entry.name.rfind(".")
                ctype = CONTENT_TYPES.get(entry.name[dot:].lower(), _OCTETS) if dot > 0 else _OCTETS
                etag = b'"' + hashlib.sha256(body).hexdigest()[:32].encode() + b'"'
                files[prefix + entry.name] = StaticFile(body, ctype, etag)

    try:
        if root.is_dir():
            walk(root, "", 0)
    except OSError as exc:  # an unreadable file: the page is missing, the API still works
        log.error("the dashboard's files cannot be read (%s): %s", folder, exc)
        return {}
    return files


_FILES: dict[tuple[str, str], dict[str, StaticFile]] = {}


def static_files(package: str = STATIC_PACKAGE, folder: str = STATIC_FOLDER) -> dict[str, StaticFile]:
    """:func:`load_files`, once per process (a config reload builds a new gateway, not new files)."""
    key = (package, folder)
    if key not in _FILES:
        _FILES[key] = load_files(package, folder)
    return _FILES[key]


def _etag_matches(header: bytes | None, etag: bytes) -> bool:
    if header is None:
        return False
    if header.strip() == b"*":
        return True
    return any(tag.strip().removeprefix(b"W/") == etag for tag in header.split(b","))


class Dashboard:
    """The page's door of one gateway (built with its :class:`~.api.AdminAPI`)."""

    def __init__(self, api: AdminAPI, files: dict[str, StaticFile] | None = None) -> None:
        self.api = api
        self.gateway = api.gateway
        self.files = static_files() if files is None else files
        config = self.gateway.config
        self.base = config.base_path
        self.cookie_path = f"{config.base_path}/admin/"
        self.secure = config.tls is not None

    async def serve(self, ctx: RequestContext, request: Request, responder: Responder) -> None:
        """Answer a request for ``/admin`` or ``/admin/...`` (not ``/admin/api/...``); every answer, errors
        included, with the security headers."""
        ctx.unlogged = True
        try:
            await self._serve(ctx, request, responder)
        except GatewayError as exc:
            exc.headers = [*exc.headers, *SECURITY_HEADERS, _NO_STORE]
            raise

    async def _serve(self, ctx: RequestContext, request: Request, responder: Responder) -> None:
        path = request.path
        if path == b"/admin":
            self._methods(request, _GET, b"GET, HEAD")
            await self._send(ctx, responder, 308, [(b"location", f"{self.base}/admin/".encode()), _NO_STORE])
            return
        rest = path[len(b"/admin/"):].decode("latin-1")
        if rest == "login":
            await self.login(ctx, request, responder)
        elif rest == "logout":
            await self.logout(ctx, request, responder)
        elif rest == "" or rest == "index.html":
            self._methods(request, _GET, b"GET, HEAD")
            await self._file(ctx, request, responder, "index.html")
        elif rest.startswith("static/"):
            self._methods(request, _GET, b"GET, HEAD")
            await self._file(ctx, request, responder, rest[len("static/"):])
        else:
            shown = quote(self.gateway.redact, f"{self.base}/admin/{rest}", 200)
            raise NotFound(f"no such page: {shown} (the dashboard is {self.base}/admin/)", code="unknown_url")

    @staticmethod
    def _methods(request: Request, allowed: frozenset[bytes], allow: bytes) -> None:
        if request.method not in allowed:
            raise MethodNotAllowed(f"{request.method.decode('latin-1')} is not allowed here; use {allow.decode()}",
                                   headers=[(b"allow", allow)])

    async def _send(self, ctx: RequestContext, responder: Responder, status: int, headers: Headers,
                    body: bytes | None = None) -> None:
        """An answer with the security headers; ``body`` None: none at all (no Content-Length: 204, 304, 308)."""
        ctx.status = status
        headers = [*SECURITY_HEADERS, *headers, (b"x-request-id", ctx.request_id.encode())]
        if body is None:
            await responder.start(status, headers)
            await responder.end()
        else:
            await responder.send(status, headers, body)

    async def _file(self, ctx: RequestContext, request: Request, responder: Responder, name: str) -> None:
        f = self.files.get(name)
        if f is None:
            if name == "index.html":
                raise NotFound("the dashboard's page is not in this build (at_gateway/admin/static/index.html is "
                               "missing); the admin API works without it", code="unknown_url")
            raise NotFound("no such file: " + quote(self.gateway.redact, f"{self.base}/admin/static/{name}", 200),
                           code="unknown_url")
        if f.html:
            await self._send(ctx, responder, 200, [(b"content-type", f.content_type), _NO_STORE], f.body)
            return
        headers = [(b"content-type", f.content_type), _NO_CACHE, (b"etag", f.etag)]
        if _etag_matches(request.header(b"if-none-match"), f.etag):
            await self._send(ctx, responder, 304, [_NO_CACHE, (b"etag", f.etag)])
            return
        await self._send(ctx, responder, 200, headers, f.body)

    # -- login, logout ----------------------------------------------------------
    def _cookies(self, session: Session | None, secure: bool) -> Headers:
        """The two Set-Cookie headers of a new session; ``None``: both cleared."""
        common = f"; Path={self.cookie_path}; SameSite=Strict{'; Secure' if secure else ''}"
        if session is None:
            return [(b"set-cookie", f"{SESSION_COOKIE}=; Max-Age=0; HttpOnly{common}".encode()),
                    (b"set-cookie", f"{CSRF_COOKIE}=; Max-Age=0{common}".encode())]
        ttl = max(0, int(session.expires_at - time.time()))
        return [(b"set-cookie", f"{SESSION_COOKIE}={session.cookie}; Max-Age={ttl}; HttpOnly{common}".encode()),
                (b"set-cookie", f"{CSRF_COOKIE}={session.csrf}; Max-Age={ttl}{common}".encode())]

    def _secure_request(self, request: Request) -> bool:
        """TLS here, or at a proxy in front that says so (then the cookies must be Secure too)."""
        proto = request.header(b"x-forwarded-proto")
        return self.secure or (proto is not None and proto.split(b",")[0].strip().lower() == b"https")

    def _check_write(self, request: Request) -> None:
        admin = self.gateway.config.admin
        if len(request.body) > admin.max_body_size:
            raise PayloadTooLarge(f"admin request bodies are limited to {admin.max_body_size} bytes "
                                  "(admin.max_body_size)")
        same_origin(request)

    async def login(self, ctx: RequestContext, request: Request, responder: Responder) -> None:
        """``POST {base_path}/admin/login`` ``{"token": "<admin token>"}``: 204 with the session cookies."""
        self._methods(request, frozenset((b"POST",)), b"POST")
        self._check_write(request)
        auth = self.api.auth
        if not self.gateway.config.admin.tokens:
            raise Forbidden("the dashboard's login takes an admin token, and this gateway has none (admin_token); "
                            "with forward auth, open the admin API through your sign-in proxy",
                            code="login_unavailable")
        if not auth.sessions_possible():
            raise sessions_need_a_store()
        services = self.gateway.services
        state = process_state(services)
        address = client_address(request)
        now = services.clock()
        state.check(address, now, "too_many_logins")
        body = AdminRequest(self.gateway, request, ctx, "", {}, {}).json(allowed=("token",), required=("token",))
        token = body["token"]
        if not isinstance(token, str) or not token:
            raise invalid(["body.token: must be the admin token, a non-empty string"])
        index = auth.token_index(token.encode("utf-8", "surrogatepass"))
        if index is None:
            state.login_failed(address, now)
            raise Unauthorized("this is not an admin token (client keys and gateway keys do not open the dashboard)",
                               code="invalid_admin_token")
        session = auth.new_session(index)
        await self._audit(session.actor, "session.login", {"client": address})
        await self._send(ctx, responder, 204, [_NO_STORE, *self._cookies(session, self._secure_request(request))])

    async def logout(self, ctx: RequestContext, request: Request, responder: Responder) -> None:
        """``POST {base_path}/admin/logout``: the session revoked (every worker), both cookies cleared; 204
        whether or not there was a session."""
        self._methods(request, frozenset((b"POST",)), b"POST")
        self._check_write(request)
        auth = self.api.auth
        jar = cookies(request)
        for value in jar.get(SESSION_COOKIE, [])[:8]:
            session, _ = auth.verify_session(value)
            if session is not None:
                await auth.revoke(session)
                await self._audit(session.actor, "session.logout", {})
        await self._send(ctx, responder, 204, [_NO_STORE, *self._cookies(None, self._secure_request(request))])

    async def _audit(self, actor: str, action: str, change: dict[str, Any]) -> None:
        """An audit row for a login or a logout, when there is a database (a failure to write one is logged,
        not the user's problem: the session is valid either way)."""
        catalog = getattr(self.gateway.services, "catalog", None)
        if catalog is None:
            return
        try:
            await catalog.call(catalog.audit, actor, action, None, change)
        except Exception as exc:  # noqa: BLE001
            log.warning("audit row for %s not written: %s", action, exc)


# -- GET session -------------------------------------------------------------------------------------------

async def session_info(req: AdminRequest) -> Answer:
    """``GET session``: who the caller is and when their dashboard session ends (null: not a session, a token
    or forward auth); 401 without a valid login."""
    if req.query:
        raise BadRequest("GET session takes no query parameters", code="invalid_query")
    session = req.session
    return Answer({"object": "session", "actor": req.actor,
                   "expires_at": session.expires_at if session is not None else None})


ROUTES: list[Route] = [
    ("GET", ("session",), session_info),
]


__all__ = ["CSP", "ROUTES", "SECURITY_HEADERS", "Dashboard", "StaticFile", "load_files", "static_files"]
