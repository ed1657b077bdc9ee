"""Who may use the admin API: an admin token (``Authorization: Bearer``), or the site's forward auth.

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
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING

import anyio

from ..config import AdminConfig, ForwardAuthConfig
from ..errors import Forbidden, GatewayError, Unauthorized, UpstreamFailed, UpstreamTimedOut
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


class AdminAuth:
    def __init__(self, config: AdminConfig, gateway: Gateway) -> None:
        self.config = config
        self.gateway = gateway
        self._tokens = [t.encode() for t in config.tokens]
        fa = config.forward_auth
        self._send = frozenset(n.encode() for n in fa.auth_request_headers) - _NOT_FORWARDED if fa else frozenset()
        self._take = tuple(n.encode() for n in fa.auth_response_headers) if fa else ()

    def token_actor(self, presented: bytes) -> str | None:
        """``token<i>`` for the admin token ``presented`` is; compared with every token (constant time)."""
        found = -1
        for i, token in enumerate(self._tokens):
            if hmac.compare_digest(presented, token) and found < 0:
                found = i
        return f"token{found}" if found >= 0 else None

    async def check(self, request: Request) -> str:
        """The actor for the audit log, or raise (401; or forward auth's own answer)."""
        if self._take:
            # Only the auth service may set these: a client's own X-Auth-User never reaches a handler.
            taken = frozenset(self._take)
            request.headers = [(k, v) for k, v in request.headers if k not in taken]
        auth = request.header(b"authorization")
        presented = auth[7:].strip() if auth is not None and auth[:7].lower() == b"bearer " else None
        if presented:
            actor = self.token_actor(presented)
            if actor is not None:
                return actor
        if self.config.forward_auth is not None:
            return await self.forward(request, self.config.forward_auth)
        raise Unauthorized(_BAD_TOKEN if presented else _NO_TOKEN, code="invalid_admin_token", headers=[_WWW_AUTH])

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
