"""Who may use the admin API: an admin token (``Authorization: Bearer``), the dashboard's session cookie, or the
site's forward auth.

Admin tokens are their own secrets: client keys and the gateway's ``api_key`` never open the admin API,
and an admin token opens nothing else (unless it is also configured as a gateway key).

Forward auth (``admin.forward_auth``, as Traefik's ForwardAuth and AT's README describe it) is for sites
that already run an SSO proxy: a request without a valid admin token is first asked about at the auth
service, with a GET that carries only the configured request headers (default ``Authorization`` and
``Cookie``) and ``X-Forwarded-Method``/``-Uri``/``-For``, never the body. A 2xx lets it in; anything else
is the answer (a 302 to the login page keeps its ``Location``). The auth service's
``auth_response_headers`` (such as ``X-Auth-User``) are then on the request the handlers see:
``req.request.header(b"x-auth-user")``. Copies a client sent itself of those names are removed from every
admin request first, so that a handler can trust them; the first one present names the audit actor.

Dashboard sessions (``POST {base_path}/admin/login`` with an admin token: see :mod:`.dashboard`). The cookie
``atg_session`` is ``<id>.<expires_at>.<mac>``: a random 128-bit id, the expiry in Unix seconds, and an
HMAC-SHA256 over both under a key derived from the admin token that logged in
(``HMAC(token, "at-gateway dashboard session v1")``). So it cannot be forged or extended without a token,
every worker accepts it without shared state (each derives the same keys from the configuration), and
removing or rotating that token ends its sessions. It is refused once expired, and when it claims to
outlive ``admin.session_ttl`` from now (a lowered ttl shortens the sessions already given). Logout revokes
it: its id goes into ``admin_sessions_revoked`` (kept until it would have expired), which every worker
reads on each cookie-authenticated call (one primary-key lookup); with an in-memory store, into this
process's memory -- which another worker cannot read, so with ``workers > 1`` and ``store.path: ":memory:"``
there are no dashboard sessions at all: login and the session cookie are refused with 409
``sessions_need_a_store`` (set ``store.path``, or use the admin token as Bearer), rather than a logout that
ends the session in one worker out of N. (With one process and a memory store, revocations last until the
restart: the cookie, still signed and unexpired, opens the dashboard again afterwards.)

``atg_csrf`` (readable by the page) is ``HMAC(key, "c." + id)``: a write made with the session cookie must
send it back as ``X-CSRF-Token`` (a double-submit bound to the session: a cookie planted by a sibling site
cannot be paired with a valid token), else 403 ``csrf_failed``. The actor of a session is
``session:token<i>``.

Wrong credentials are limited per client address, whichever door they came through: a wrong admin token at
``POST login``, as ``Authorization: Bearer`` on the admin API, and a wrong Bearer or Basic credential on
``/metrics`` all count in one :class:`AdminState` per process; past ``LOGIN_FAILURES`` in ``LOGIN_WINDOW``
seconds every one of those doors answers 429 with Retry-After, even to the right credential (a limit that let
the right guess through would tell the attacker which guess was right). A request that presents no credential
is not a guess and is not counted; nor is a bad session cookie (it is signed: it cannot be guessed), nor a
Bearer that forward auth admits (the SSO's own token). The address is the TCP peer's (see
:class:`AdminState` for what that means behind a reverse proxy).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import sqlite3
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio

from ..config import AdminConfig, ForwardAuthConfig
from ..errors import Conflict, Forbidden, GatewayError, Unauthorized, UpstreamFailed, UpstreamTimedOut
from ..http.errors import UpstreamError

if TYPE_CHECKING:
    from ..app import Gateway
    from ..http.server import Request

Headers = list[tuple[bytes, bytes]]

_WWW_AUTH = (b"www-authenticate", b'Bearer realm="at-gateway admin"')
_NO_TOKEN = "the admin API needs an admin token: send it as Authorization: Bearer TOKEN"
_BAD_TOKEN = "this is not an admin token (client keys and gateway keys do not open the admin API)"

# Never copied from the client to the auth service even when listed: framing and hop-by-hop fields belong
# to each connection (a listed Host would be a second Host header), the X-Forwarded-* ones are ours.
_NOT_FORWARDED = frozenset((b"host", b"content-length", b"transfer-encoding", b"connection", b"keep-alive",
                            b"te", b"trailer", b"upgrade", b"expect", b"proxy-connection",
                            b"x-forwarded-method", b"x-forwarded-uri", b"x-forwarded-for"))
# Of a refusal, these reach the client: where to sign in, and how to authenticate.
_PASSED_BACK = (b"location", b"www-authenticate")
_MAX_ACTOR = 200  # characters of the auth service's user name kept for the audit log

SESSION_COOKIE = "atg_session"
CSRF_COOKIE = "atg_csrf"
CSRF_HEADER = b"x-csrf-token"
_SESSION_LABEL = b"at-gateway dashboard session v1"
_SESSION_RE = re.compile(r"^([A-Za-z0-9_-]{22})\.(\d{1,12})\.([A-Za-z0-9_-]{43})$")
_UNSAFE = frozenset((b"POST", b"PUT", b"PATCH", b"DELETE"))
_MAX_COOKIES = 8  # atg_session values looked at (a stale one of another path may come first)
_TTL_SLACK = 60  # seconds a cookie may claim beyond session_ttl from now (clocks of workers, the second it was made)
#: Failed logins per client address: this many in a window, then 429 until the oldest leaves the window.
LOGIN_FAILURES = 10
LOGIN_WINDOW = 60.0
_MAX_ADDRESSES = 10_000  # addresses whose failures are remembered (past it, the stalest are forgotten)
_REVOKED_SQL = "SELECT 1 FROM admin_sessions_revoked WHERE id = ? AND expires_at > ?"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def session_key(token: str | bytes) -> bytes:
    """The key sessions of an admin token are signed with."""
    return hmac.new(token.encode() if isinstance(token, str) else token, _SESSION_LABEL, hashlib.sha256).digest()


def sign_session(key: bytes, session_id: str, expires_at: int) -> str:
    """The ``atg_session`` cookie value of a session."""
    mac = hmac.new(key, f"s.{session_id}.{expires_at}".encode(), hashlib.sha256).digest()
    return f"{session_id}.{expires_at}.{_b64(mac)}"


def csrf_of(key: bytes, session_id: str) -> str:
    """The ``atg_csrf`` value (and X-CSRF-Token) of a session."""
    return _b64(hmac.new(key, f"c.{session_id}".encode(), hashlib.sha256).digest())


@dataclass(frozen=True)
class Session:
    """A valid dashboard session (its cookie verified)."""

    id: str
    expires_at: int
    actor: str  # "session:token<i>"
    csrf: str = field(repr=False)
    cookie: str = field(repr=False)


@dataclass(frozen=True)
class Identity:
    """Who an admin request is: the audit actor, and the session when a cookie authenticated it."""

    actor: str
    session: Session | None = None


class AdminState:
    """What the admin door keeps per process across config reloads (a reload builds a new gateway, and with it a
    new :class:`AdminAuth`): revoked sessions without a database, wrong admin credentials per client address
    (from the login, the admin API's Bearer and ``/metrics``: one count, see the module doc).

    Per process: with ``workers: N`` each worker counts the failures it saw (an address gets at most N times
    the allowance, as the kernel spreads its connections); revocations are shared through the database.

    Per *peer address*: the TCP peer, never ``X-Forwarded-For`` (any client can write that header, and a limit
    keyed on it would give every guess a fresh address). Behind a reverse proxy every client therefore shares
    the proxy's address: the limit then holds for all of them together, and ``LOGIN_FAILURES`` wrong guesses
    from anyone lock every user behind that proxy out of the login, the admin API's Bearer and ``/metrics``
    for up to ``LOGIN_WINDOW`` seconds (a dashboard session already open keeps working). Put the admin paths
    on a proxy that limits per client itself, or reach the gateway directly, where that matters."""

    def __init__(self) -> None:
        self.revoked: dict[str, float] = {}  # session id -> expiry (an in-memory store only)
        self.failures: dict[str, deque[float]] = {}

    def login_wait(self, address: str, now: float) -> float | None:
        """Seconds until ``address`` may try again; None: it may now."""
        seen = self.failures.get(address)
        if seen is None or len(seen) < LOGIN_FAILURES:
            return None
        wait = seen[0] + LOGIN_WINDOW - now
        return wait if wait > 0 else None

    def check(self, address: str, now: float, code: str = "too_many_failures") -> None:
        """Raise 429 (``code``, with Retry-After) while ``address`` is over the limit of wrong credentials."""
        wait = self.login_wait(address, now)
        if wait is not None:
            raise too_many_failures(address, wait, code)

    def login_failed(self, address: str, now: float) -> None:
        """A wrong admin credential (or metrics password) from ``address``, at any door."""
        seen = self.failures.get(address)
        if seen is None:
            if len(self.failures) >= _MAX_ADDRESSES:
                self._forget(now)
            seen = self.failures[address] = deque(maxlen=LOGIN_FAILURES)
        seen.append(now)

    def _forget(self, now: float) -> None:
        """Room for a new address: those whose failures all left the window, else the oldest half."""
        stale = [a for a, seen in self.failures.items() if seen[-1] + LOGIN_WINDOW <= now]
        if len(stale) < len(self.failures) // 10:
            stale = list(self.failures)[:len(self.failures) // 2]
        for address in stale:
            del self.failures[address]

    def revoke(self, session_id: str, expires_at: float, now: float) -> None:
        self.revoked = {k: v for k, v in self.revoked.items() if v > now}
        self.revoked[session_id] = expires_at


def too_many_failures(address: str, wait: float, code: str = "too_many_failures") -> GatewayError:
    """The 429 every door that takes an admin credential answers while ``address`` is over the limit."""
    seconds = int(wait) + 1
    return GatewayError(f"too many wrong admin credentials from {address} (the dashboard's login, the admin API "
                        f"and /metrics count together): try again in {seconds}s", status=429,
                        type="rate_limit_error", code=code, headers=[(b"retry-after", str(seconds).encode())])


def client_address(request: Request) -> str:
    """The address failures are counted under: the TCP peer's IP (never a header a client can write)."""
    return _client_ip(request.client) or request.client or "unknown"


def sessions_need_a_store() -> Conflict:
    """409: with several workers and an in-memory store a logout could not reach the other workers."""
    return Conflict("dashboard sessions need a database file with workers > 1 (a logout must reach every worker, "
                    "and an in-memory store is one worker's): set store.path (or state_dir) and restart, or use "
                    "the admin API with the admin token (Authorization: Bearer ...)", code="sessions_need_a_store")


def process_state(services: Any) -> AdminState:
    """The :class:`AdminState` of this process, kept on its services (built once per process, kept across
    reloads)."""
    state = services.admin_state
    if state is None:
        state = AdminState()
        services.admin_state = state
    return state


def cookies(request: Request) -> dict[str, list[str]]:
    """The request's cookies by name (every value of a name, in order); a malformed pair is skipped."""
    out: dict[str, list[str]] = {}
    for name, value in request.headers:
        if name != b"cookie":
            continue
        for pair in value.decode("latin-1").split(";"):
            k, sep, v = pair.strip().partition("=")
            if sep and k:
                out.setdefault(k, []).append(v.strip().strip('"'))
    return out


class AdminAuth:
    def __init__(self, config: AdminConfig, gateway: Gateway) -> None:
        self.config = config
        self.gateway = gateway
        self._tokens = [t.encode() for t in config.tokens]
        self._session_keys = [session_key(t) for t in self._tokens]
        fa = config.forward_auth
        self._send = frozenset(n.encode() for n in fa.auth_request_headers) - _NOT_FORWARDED if fa else frozenset()
        self._take = tuple(n.encode() for n in fa.auth_response_headers) if fa else ()

    def token_index(self, presented: bytes) -> int | None:
        """Which admin token ``presented`` is (its index); compared with every token (constant time)."""
        found = -1
        for i, token in enumerate(self._tokens):
            if hmac.compare_digest(presented, token) and found < 0:
                found = i
        return found if found >= 0 else None

    def token_actor(self, presented: bytes) -> str | None:
        """``token<i>`` for the admin token ``presented`` is; compared with every token (constant time)."""
        found = self.token_index(presented)
        return f"token{found}" if found is not None else None

    async def check(self, request: Request) -> str:
        """The actor for the audit log, or raise (401; or forward auth's own answer)."""
        return (await self.authenticate(request)).actor

    async def authenticate(self, request: Request) -> Identity:
        """Who is asking: an admin token, else the dashboard's session cookie (for a write, with its CSRF
        header), else forward auth; or raise (401, 403 ``csrf_failed``, or forward auth's own answer)."""
        if self._take:
            # Only the auth service may set these: a client's own X-Auth-User never reaches a handler.
            taken = frozenset(self._take)
            request.headers = [(k, v) for k, v in request.headers if k not in taken]
        auth = request.header(b"authorization")
        presented = auth[7:].strip() if auth is not None and auth[:7].lower() == b"bearer " else None
        services = self.gateway.services
        address, now = "", 0.0
        if presented:
            # A guess at the admin token: counted with the login's (429 once over the limit, even when right).
            address, now = client_address(request), services.clock()
            process_state(services).check(address, now)
            actor = self.token_actor(presented)
            if actor is not None:
                return Identity(actor)
        refused: GatewayError | None = None
        if not presented:
            jar = cookies(request)
            if SESSION_COOKIE in jar:
                if not self.sessions_possible():
                    refused = sessions_need_a_store()
                else:
                    session, refused = await self.session_of(jar[SESSION_COOKIE])
                    if session is not None:
                        if request.method in _UNSAFE:
                            _check_csrf(request, jar, session)
                        return Identity(session.actor, session)
        if self.config.forward_auth is not None:
            try:
                return Identity(await self.forward(request, self.config.forward_auth))
            except GatewayError as exc:
                if presented and exc.status < 500:  # refused by the auth service too: a wrong guess
                    process_state(services).login_failed(address, now)
                raise
        if refused is not None:
            raise refused
        if presented:
            process_state(services).login_failed(address, now)
        raise Unauthorized(_BAD_TOKEN if presented else _NO_TOKEN, code="invalid_admin_token", headers=[_WWW_AUTH])

    def sessions_possible(self) -> bool:
        """Whether dashboard sessions can be ended everywhere they are accepted: a database file, or one
        process (see the module doc: ``sessions_need_a_store``)."""
        return self.gateway.config.workers <= 1 or getattr(self.gateway.services, "catalog", None) is not None

    # -- dashboard sessions ----------------------------------------------------
    def new_session(self, index: int, now: float | None = None) -> Session:
        """A new session for admin token ``index`` (which must exist), expiring ``admin.session_ttl`` from now."""
        now = time.time() if now is None else now
        key = self._session_keys[index]
        sid = _b64(os.urandom(16))
        expires = int(now + self.config.session_ttl)
        return Session(sid, expires, f"session:token{index}", csrf_of(key, sid), sign_session(key, sid, expires))

    def verify_session(self, value: str, now: float | None = None) -> tuple[Session | None, str]:
        """The session of a cookie value, and why not when not: ``"ok"``, ``"expired"``, ``"invalid"``
        (malformed, signed by no current token, or claiming to outlive ``session_ttl``). Revocation is
        :meth:`session_of`'s (it needs the database)."""
        now = time.time() if now is None else now
        m = _SESSION_RE.match(value)
        if m is None:
            return None, "invalid"
        sid, expires = m[1], int(m[2])
        found = -1
        for i, key in enumerate(self._session_keys):  # every key, no early exit
            if hmac.compare_digest(sign_session(key, sid, expires), value) and found < 0:
                found = i
        if found < 0 or expires > now + self.config.session_ttl + _TTL_SLACK:
            return None, "invalid"
        if expires <= now:
            return None, "expired"
        key = self._session_keys[found]
        return Session(sid, expires, f"session:token{found}", csrf_of(key, sid), value), "ok"

    async def session_of(self, values: list[str]) -> tuple[Session | None, Unauthorized | None]:
        """The first valid, unrevoked session among the cookie's values; else the 401 to answer."""
        reason = "invalid"
        for value in values[:_MAX_COOKIES]:
            session, why = self.verify_session(value)
            if session is not None:
                if not await self.revoked(session):
                    return session, None
                why = "revoked"
            if why != "invalid" or reason == "invalid":
                reason = why
        text = {"expired": "the dashboard session has expired: log in again",
                "revoked": "the dashboard session has ended (logged out): log in again"}.get(
            reason, "the dashboard session cookie is not valid (forged, or signed with an admin token that is no "
                    "longer configured): log in again")
        return None, Unauthorized(text, code="session_expired" if reason == "expired" else "invalid_session",
                                  headers=[_WWW_AUTH])

    async def revoked(self, session: Session) -> bool:
        """Whether the session was logged out (in this process's memory, or in the database: any worker's)."""
        services = self.gateway.services
        now = time.time()
        if process_state(services).revoked.get(session.id, 0.0) > now:
            return True
        catalog = getattr(services, "catalog", None)
        if catalog is None:
            return False
        conn = catalog.conn

        def look() -> bool:
            return conn.execute(_REVOKED_SQL, (session.id, now)).fetchone() is not None

        try:
            return bool(await catalog.call(look))
        except sqlite3.OperationalError as exc:
            from .api import is_busy, store_busy

            if is_busy(exc):
                raise store_busy("the session could not be checked") from None
            raise

    async def revoke(self, session: Session) -> None:
        """End ``session`` in every worker: its id kept until it would have expired."""
        services = self.gateway.services
        now = time.time()
        process_state(services).revoke(session.id, session.expires_at, now)
        catalog = getattr(services, "catalog", None)
        if catalog is None:
            return
        conn = catalog.conn

        def write() -> None:
            with catalog.transaction():
                conn.execute("DELETE FROM admin_sessions_revoked WHERE expires_at <= ?", (now,))
                conn.execute("INSERT OR REPLACE INTO admin_sessions_revoked (id, expires_at) VALUES (?, ?)",
                             (session.id, session.expires_at))

        await catalog.call(write)

    async def forward(self, request: Request, fa: ForwardAuthConfig) -> str:
        """Ask the auth service about ``request``: the actor on a 2xx (its response headers added to the
        request), else raise its answer. Bounded by ``fa.timeout`` as a whole: a slow service is a 504,
        never a hung admin call."""
        headers: Headers = [(k, v) for k, v in request.headers if k in self._send]
        headers += [(b"x-forwarded-method", request.method), (b"x-forwarded-uri", request.target)]
        ip = _client_ip(request.client)
        if ip:
            headers.append((b"x-forwarded-for", ip.encode()))
        try:
            with anyio.fail_after(fa.timeout):
                status, answer, _ = await self.gateway.client.request(b"GET", fa.address, headers)
        except TimeoutError:
            raise UpstreamTimedOut(f"the forward auth service did not answer within {fa.timeout:g}s "
                                   "(admin.forward_auth.timeout)", code="forward_auth_timeout") from None
        except UpstreamError as exc:
            # The client's message names host and port only; redacted all the same (a URL may hold userinfo).
            raise UpstreamFailed("the forward auth service cannot be reached: " + self.gateway.redact(str(exc)),
                                 code="forward_auth_unavailable") from None
        if 200 <= status < 300:
            return self._admit(request, answer)
        raise _refusal(status, answer)

    def _admit(self, request: Request, answer: Headers) -> str:
        got = [(k, v) for k, v in answer if k in self._take]
        if got:
            request.headers = [*request.headers, *got]
        for name in self._take:  # the first configured name the service sent names the user
            value = next((v for k, v in got if k == name), None)
            if value is not None:
                user = "".join(c for c in value.decode("latin-1").strip() if c.isprintable())[:_MAX_ACTOR]
                if user:
                    return f"forward-auth:{user}"
        return "forward-auth"


def _check_csrf(request: Request, jar: dict[str, list[str]], session: Session) -> None:
    """A write with the session cookie must send ``X-CSRF-Token``, equal to the ``atg_csrf`` cookie and to the
    session's own value (both compared in constant time)."""
    sent = request.header(CSRF_HEADER)
    cookie = (jar.get(CSRF_COOKIE) or [""])[0].encode("latin-1")
    want = session.csrf.encode()
    if sent is None or not cookie:
        raise Forbidden("a change made with the dashboard's session must send the X-CSRF-Token header (the value "
                        "of the atg_csrf cookie)", code="csrf_failed")
    same = hmac.compare_digest(sent.strip(), cookie)
    valid = hmac.compare_digest(sent.strip(), want)
    if not (same and valid):
        raise Forbidden("the X-CSRF-Token header does not match this session's atg_csrf cookie: reload the page",
                        code="csrf_failed")


def _refusal(status: int, answer: Headers) -> GatewayError:
    """The client's answer when the auth service said no: its status, the headers a browser needs to sign
    in (never the service's body: it is the service's page, not an API error)."""
    passed = [(k, v) for k, v in answer if k in _PASSED_BACK]
    if 300 <= status < 400 and status != 304:
        where = "" if any(k == b"location" for k, _ in passed) else " (without a Location)"
        return GatewayError(f"sign in first: the forward auth service redirects{where}", status=status,
                            type="invalid_request_error", code="forward_auth_redirect", headers=passed)
    if status == 401:
        return Unauthorized("the forward auth service did not authenticate this request", code="forward_auth_denied",
                            headers=passed)
    if status == 403:
        return Forbidden("the forward auth service refused this request", code="forward_auth_denied", headers=passed)
    if 400 <= status < 500:
        return GatewayError(f"the forward auth service refused this request ({status})", status=status,
                            type="invalid_request_error", code="forward_auth_denied", headers=passed)
    if 500 <= status < 600:
        return GatewayError(f"the forward auth service failed ({status})", status=status, type="server_error",
                            code="forward_auth_error")
    # 1xx as a final answer, 304 (no body allowed), or beyond 599: nothing to pass on.
    return UpstreamFailed(f"the forward auth service answered {status}, which is neither 2xx nor a refusal",
                          code="forward_auth_bad_answer")


def _client_ip(client: str) -> str | None:
    """``1.2.3.4`` of ``1.2.3.4:5678`` (``::1`` of ``::1:5678``); None when the server does not know."""
    host, sep, port = client.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]") or None
