"""Who gets through the admin door, over real sockets: the explicit opt-in (403 without a token), admin
tokens and their rotation, keys that must not open it (and the admin token not opening the chat API),
``base_path``, forward auth against a small auth server of our own, and bounded admin bodies.

Other admin endpoints may not exist yet: a 404 ``unknown_url`` is answered only after authentication (an
unauthenticated request to the same path is 401 first), so it proves that the door let the request in.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from at_gateway.admin.api import AdminRequest, Answer
from at_gateway.store import db
from at_gateway.store.keys import KeyStore
from tests.conftest import GATEWAY_KEY, RunningGateway, base_config, run_gateway, run_live
from tests.mock_upstream import MockUpstream

ADMIN = "adm-" + "a1" * 16
ADMIN2 = "adm-" + "b2" * 16
V1 = "/admin/api/v1/"
NOWHERE = V1 + "no-such-endpoint"  # never an endpoint: 404 unknown_url, after authentication
CHAT = "/v1/chat/completions"
CHAT_BODY = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def error_of(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The OpenAI-shaped error with this status and code."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert {"message", "type", "code"} <= set(err) and err["code"] == code, err
    assert isinstance(err["message"], str) and err["message"]
    return err


def admitted(r: httpx.Response) -> None:
    """The door let the request in: a handler answered, or (the endpoint not written yet, or never one)
    the table's 404 ``unknown_url``, which only an authenticated request gets."""
    assert r.status_code not in (401, 403, 413) and r.status_code < 500, (r.status_code, r.text)
    if r.status_code == 404:
        assert r.json()["error"]["code"] == "unknown_url", r.text


def live_config(tmp_path: Path, upstream: MockUpstream, **top: Any) -> dict[str, Any]:
    return base_config(upstream.url, store={"path": str(tmp_path / "gw.db")}, **top)


# -- opt-in: no admin token, no forward auth -> 403 admin_disabled ------------------------------------------

DISABLED_CALLS = [
    ("GET", V1 + "health"), ("GET", V1 + "clients"), ("POST", V1 + "clients"), ("GET", V1 + "providers/up1"),
    ("DELETE", V1 + "routes/demo"), ("POST", V1 + "reload"), ("GET", V1 + "audit"), ("GET", NOWHERE),
    ("GET", "/admin/api/v2/anything"),
]


@pytest.mark.parametrize("headers", [{}, bearer(ADMIN), bearer(GATEWAY_KEY)], ids=["none", "a-token", "gateway-key"])
def test_without_admin_token_every_admin_path_is_403_admin_disabled(upstream: MockUpstream,
                                                                    headers: dict[str, str]) -> None:
    with run_gateway(base_config(upstream.url)) as g:
        for method, path in DISABLED_CALLS:
            r = httpx.request(method, g.url + path, headers=headers, json={} if method == "POST" else None)
            err = error_of(r, 403, "admin_disabled")
            assert err["type"] == "permission_error" and "admin_token" in err["message"], (method, path)
        assert httpx.post(g.url + CHAT, headers=bearer(GATEWAY_KEY), json=CHAT_BODY).status_code == 200
    assert upstream.received == []  # nothing behind the door ran


# -- admin tokens ----------------------------------------------------------------------------------------------

@pytest.fixture
def with_token(tmp_path: Path, upstream: MockUpstream) -> Iterator[tuple[RunningGateway, str]]:
    """A gateway as ``serve`` runs it, an admin token configured, and a client key in its database."""
    conn = db.connect(str(tmp_path / "gw.db"))
    try:
        _, client_key = KeyStore(conn).create("app")
    finally:
        conn.close()
    with run_live(live_config(tmp_path, upstream, admin_token=ADMIN)) as g:
        yield g, client_key


@pytest.mark.parametrize("path", [NOWHERE, V1 + "audit", V1 + "clients"])
def test_missing_token_is_401_with_www_authenticate(with_token: tuple[RunningGateway, str], path: str) -> None:
    g, _ = with_token
    for method in ("GET", "POST"):
        r = httpx.request(method, g.url + path)
        err = error_of(r, 401, "invalid_admin_token")
        assert r.headers["www-authenticate"].startswith("Bearer"), r.headers
        assert "admin token" in err["message"]


def test_wrong_tokens_and_other_keys_are_401(with_token: tuple[RunningGateway, str]) -> None:
    g, client_key = with_token
    # The client key and the gateway key are real keys: they open the chat API...
    for key in (client_key, GATEWAY_KEY):
        assert httpx.post(g.url + CHAT, headers=bearer(key), json=CHAT_BODY).status_code == 200
    refused = {
        "wrong-token": bearer("adm-" + "x" * 32),
        "token-prefix": bearer(ADMIN[:-1]),
        "token-plus-one": bearer(ADMIN + "z"),
        "empty-bearer": {"authorization": "Bearer"},
        "basic-scheme": {"authorization": f"Basic {ADMIN}"},
        "token-in-x-api-key": {"x-api-key": ADMIN},
        "gateway-key": bearer(GATEWAY_KEY),
        "client-key": bearer(client_key),
    }
    # ...but never the admin API.
    for name, headers in refused.items():
        g.gateway.services.admin_state = None  # fresh failure counts: this test is about 401s, not the 429 limit
        for method, path in (("GET", NOWHERE), ("POST", NOWHERE), ("GET", V1 + "audit")):
            r = httpx.request(method, g.url + path, headers=headers)
            error_of(r, 401, "invalid_admin_token")
            assert "www-authenticate" in r.headers, name
    logs = g.logs.getvalue()
    assert client_key not in logs and ADMIN not in logs and GATEWAY_KEY not in logs


def test_the_admin_token_opens_the_admin_api_and_not_the_chat_api(with_token: tuple[RunningGateway, str]) -> None:
    g, _ = with_token
    for method, path in (("GET", NOWHERE), ("POST", NOWHERE), ("GET", V1 + "audit")):
        admitted(httpx.request(method, g.url + path, headers=bearer(ADMIN)))
    # Lower-case scheme: RFC 9110 auth schemes are case-insensitive.
    admitted(httpx.get(g.url + NOWHERE, headers={"authorization": f"bearer {ADMIN}"}))
    for path in (CHAT, "/v1/models"):
        r = httpx.request("POST" if path == CHAT else "GET", g.url + path, headers=bearer(ADMIN),
                          json=CHAT_BODY if path == CHAT else None)
        assert r.status_code == 401, r.text
        assert ADMIN not in r.text


def test_an_admin_token_that_is_also_a_gateway_key_opens_both(tmp_path: Path, upstream: MockUpstream) -> None:
    with run_live(live_config(tmp_path, upstream, admin_token=ADMIN, api_keys=[ADMIN])) as g:
        assert httpx.post(g.url + CHAT, headers=bearer(ADMIN), json=CHAT_BODY).status_code == 200
        admitted(httpx.get(g.url + NOWHERE, headers=bearer(ADMIN)))


def test_admin_tokens_rotation_both_work(tmp_path: Path, upstream: MockUpstream) -> None:
    with run_live(live_config(tmp_path, upstream, admin_tokens=[ADMIN, ADMIN2])) as g:
        for token in (ADMIN, ADMIN2):
            admitted(httpx.get(g.url + NOWHERE, headers=bearer(token)))
            admitted(httpx.get(g.url + V1 + "audit", headers=bearer(token)))
        error_of(httpx.get(g.url + NOWHERE, headers=bearer("adm-" + "c3" * 16)), 401, "invalid_admin_token")
        auth = g.live.gateway._admin.auth  # type: ignore[attr-defined]
        # The audit log's actor is the token's index: the value itself is never recorded.
        assert [auth.token_actor(t.encode()) for t in (ADMIN, ADMIN2, "nope")] == ["token0", "token1", None]


def test_admin_bodies_over_max_body_size_are_413(tmp_path: Path, upstream: MockUpstream) -> None:
    with run_live(live_config(tmp_path, upstream, admin_token=ADMIN, admin={"max_body_size": 1024})) as g:
        big = json.dumps({"name": "x" * 2000}).encode()
        for headers in (bearer(ADMIN), {}):
            r = httpx.post(g.url + V1 + "clients", headers={**headers, "content-type": "application/json"},
                           content=big)
            err = error_of(r, 413, "request_too_large")
            assert "admin.max_body_size" in err["message"]
        admitted(httpx.post(g.url + NOWHERE, headers=bearer(ADMIN), content=b"x" * 1024))
        # The chat API keeps its own, larger limit.
        chat = {**CHAT_BODY, "messages": [{"role": "user", "content": "y" * 4000}]}
        assert httpx.post(g.url + CHAT, headers=bearer(GATEWAY_KEY), json=chat).status_code == 200


# -- base_path -----------------------------------------------------------------------------------------------

def test_base_path_serves_every_endpoint_under_the_prefix(tmp_path: Path, upstream: MockUpstream) -> None:
    with run_live(live_config(tmp_path, upstream, admin_token=ADMIN, base_path="/llm")) as g:
        sdk = openai.OpenAI(base_url=g.url + "/llm/v1", api_key=GATEWAY_KEY, max_retries=0)
        reply = sdk.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content
        assert "demo" in [m.id for m in sdk.models.list()]
        assert httpx.post(g.url + "/llm/chat/completions", headers=bearer(GATEWAY_KEY),
                          json=CHAT_BODY).status_code == 200
        assert httpx.get(g.url + "/llm/health").status_code == 200
        # The admin door is under the prefix too: 401 without the token, in with it.
        for path in ("/llm" + NOWHERE, "/llm" + V1 + "audit"):
            error_of(httpx.get(g.url + path), 401, "invalid_admin_token")
            admitted(httpx.get(g.url + path, headers=bearer(ADMIN)))
        outside = ["/v1/models", "/health", "/llmx/v1/models", "/llmv1/models", "/v1/llm/models", NOWHERE,
                   V1 + "audit", "/LLM/v1/models"]
        for path in outside:
            err = error_of(httpx.get(g.url + path, headers=bearer(ADMIN)), 404, "unknown_url")
            assert "/llm" in err["message"], path
        error_of(httpx.post(g.url + CHAT, headers=bearer(GATEWAY_KEY), json=CHAT_BODY), 404, "unknown_url")


# -- forward auth -------------------------------------------------------------------------------------------

@dataclass
class Seen:
    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name]


LOGIN = "https://login.example/start?rd=admin"


class AuthServer:
    """A stand-in SSO verify endpoint on real HTTP/1.1 (keep-alive, as the gateway's pool expects). It
    records what it received and answers by the session cookie, as such services do:
    ``sess=alice`` 200 with X-Auth-User (and X-Auth-Email), ``sess=anon`` 200 without them,
    ``sess=expired`` 401, ``sess=banned`` 403, ``sess=broken`` 500, ``sess=slow`` holds until released,
    none 302 to the login page."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.release = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def handle_one_request(self) -> None:  # the gateway may give up on a slow answer
                try:
                    super().handle_one_request()
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True

            def do_GET(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                owner.seen.append(Seen(self.command, self.path, list(self.headers.items()), body))
                cookie = self.headers.get("cookie") or ""
                session = cookie.partition("sess=")[2].split(";")[0] if "sess=" in cookie else ""
                extra: dict[str, str] = {}
                if session == "slow":
                    owner.release.wait(10)
                    status = 200
                elif session in ("alice", "anon"):
                    status = 200
                    if session == "alice":
                        extra = {"X-Auth-User": "alice", "X-Auth-Email": "alice@example.org",
                                 "X-Not-Listed": "leak"}
                else:
                    status = {"expired": 401, "banned": 403, "broken": 500}.get(session, 302)
                    if status == 302:
                        extra = {"Location": LOGIN}
                    elif status == 401:
                        extra = {"WWW-Authenticate": 'Cookie realm="sso"'}
                page = b"<html>the auth service's own page</html>"
                self.send_response(status)
                for k, v in extra.items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)

            do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_GET  # a body would be recorded, never expected

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/verify?app=gw"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> AuthServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def forward_auth(address: str, timeout: float = 5.0) -> dict[str, Any]:
    return {"forward_auth": {"address": address, "timeout": timeout,
                             "auth_response_headers": ["X-Auth-User", "X-Auth-Email"]}}


async def whoami(req: AdminRequest) -> Answer:
    """A handler of the test's own: what the door hands a handler (the actor, the auth service's headers)."""
    email = req.request.header(b"x-auth-email")
    return Answer({"actor": req.actor,
                   "user": [v.decode() for k, v in req.request.headers if k == b"x-auth-user"],
                   "email": email.decode() if email is not None else None,
                   "not_listed": req.request.header(b"x-not-listed") is not None})


@contextmanager
def forward_gateway(upstream: MockUpstream, address: str, timeout: float = 5.0,
                    **top: Any) -> Iterator[RunningGateway]:
    with run_gateway(base_config(upstream.url, admin=forward_auth(address, timeout), **top)) as g:
        g.gateway._admin.routes.append(("GET", ("whoami",), whoami))
        g.gateway._admin.routes.append(("POST", ("whoami",), whoami))
        yield g


@pytest.fixture
def auth_server() -> Iterator[AuthServer]:
    with AuthServer() as server:
        yield server


SESSION = "sess=alice; theme=dark"
CLIENT_BEARER = "not-an-admin-token-" + "q" * 20


def test_forward_auth_sends_only_the_listed_headers_and_never_the_body(upstream: MockUpstream,
                                                                       auth_server: AuthServer) -> None:
    with forward_gateway(upstream, auth_server.url) as g:
        secret_body = b'{"api_key": "sk-body-must-not-travel-0123456789"}'
        r = httpx.post(g.url + V1 + "whoami?x=1&y=%2F", content=secret_body, headers={
            "cookie": SESSION, "authorization": f"Bearer {CLIENT_BEARER}", "content-type": "application/json",
            "x-api-key": "sk-client-header-not-listed", "x-forwarded-for": "6.6.6.6",
            "x-forwarded-uri": "/spoofed", "x-auth-user": "mallory", "x-custom": "v"})
        assert r.status_code == 200, r.text
        assert r.json() == {"actor": "forward-auth:alice", "user": ["alice"], "email": "alice@example.org",
                            "not_listed": False}
        assert len(auth_server.seen) == 1
        seen = auth_server.seen[0]
        assert (seen.method, seen.path, seen.body) == ("GET", "/verify?app=gw", b"")
        names = sorted(k.lower() for k, _ in seen.headers)
        assert names == ["authorization", "cookie", "host", "x-forwarded-for", "x-forwarded-method",
                         "x-forwarded-uri"], seen.headers
        assert seen.header("cookie") == [SESSION]
        assert seen.header("authorization") == [f"Bearer {CLIENT_BEARER}"]
        assert seen.header("x-forwarded-method") == ["POST"]
        assert seen.header("x-forwarded-uri") == [V1 + "whoami?x=1&y=%2F"]
        assert seen.header("x-forwarded-for") == ["127.0.0.1"]
        assert b"sk-body" not in b"".join(v.encode() for _, v in seen.headers)
        logs = g.logs.getvalue()
        assert "alice; theme" not in logs and CLIENT_BEARER not in logs


def test_forward_auth_200_without_user_header_is_actor_forward_auth(upstream: MockUpstream,
                                                                     auth_server: AuthServer) -> None:
    with forward_gateway(upstream, auth_server.url) as g:
        r = httpx.get(g.url + V1 + "whoami", headers={"cookie": "sess=anon", "x-auth-user": "mallory"})
        assert r.status_code == 200, r.text
        assert r.json() == {"actor": "forward-auth", "user": [], "email": None, "not_listed": False}
        admitted(httpx.get(g.url + NOWHERE, headers={"cookie": "sess=anon"}))
        assert [s.header("x-forwarded-uri") for s in auth_server.seen] == [[V1 + "whoami"], [NOWHERE]]


REFUSALS = [  # (session cookie, status, code, headers passed back)
    ("", 302, "forward_auth_redirect", {"location": LOGIN}),
    ("sess=expired", 401, "forward_auth_denied", {"www-authenticate": 'Cookie realm="sso"'}),
    ("sess=banned", 403, "forward_auth_denied", {}),
    ("sess=broken", 500, "forward_auth_error", {}),
]


@pytest.mark.parametrize(("cookie", "status", "code", "passed"), REFUSALS, ids=[r[2] + str(r[1]) for r in REFUSALS])
def test_forward_auth_refusals_are_answered_with_their_status(upstream: MockUpstream, auth_server: AuthServer,
                                                              cookie: str, status: int, code: str,
                                                              passed: dict[str, str]) -> None:
    with forward_gateway(upstream, auth_server.url) as g:
        headers = {"cookie": cookie} if cookie else {}
        for method, path in (("GET", V1 + "whoami"), ("POST", V1 + "whoami"), ("GET", NOWHERE)):
            r = httpx.request(method, g.url + path, headers=headers)  # httpx does not follow redirects
            error_of(r, status, code)
            for k, v in passed.items():
                assert r.headers[k] == v
            assert "auth service's own page" not in r.text and "sess=" not in r.text
        assert len(auth_server.seen) == 3
        assert upstream.received == []


def test_an_admin_token_skips_forward_auth(upstream: MockUpstream, auth_server: AuthServer) -> None:
    with forward_gateway(upstream, auth_server.url, admin_token=ADMIN) as g:
        r = httpx.get(g.url + V1 + "whoami", headers={**bearer(ADMIN), "x-auth-user": "mallory"})
        assert r.status_code == 200 and r.json()["actor"] == "token0" and r.json()["user"] == [], r.text
        assert auth_server.seen == []  # the token never went to the auth service
        # A wrong token is asked about like any other request: the service decides.
        r = httpx.get(g.url + V1 + "whoami", headers={**bearer("adm-" + "x" * 32), "cookie": "sess=alice"})
        assert r.status_code == 200 and r.json()["actor"] == "forward-auth:alice", r.text
        error_of(httpx.get(g.url + V1 + "whoami", headers=bearer("adm-" + "x" * 32)), 302, "forward_auth_redirect")
        assert len(auth_server.seen) == 2


def test_forward_auth_sees_the_full_path_under_base_path(upstream: MockUpstream, auth_server: AuthServer) -> None:
    with forward_gateway(upstream, auth_server.url, base_path="/llm") as g:
        r = httpx.get(g.url + "/llm" + V1 + "whoami?limit=2", headers={"cookie": SESSION})
        assert r.status_code == 200 and r.json()["actor"] == "forward-auth:alice", r.text
        assert auth_server.seen[0].header("x-forwarded-uri") == ["/llm" + V1 + "whoami?limit=2"]


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A port bound and not listening: connecting to it is refused at once (and nothing else can take it)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


def test_unreachable_auth_service_is_502(upstream: MockUpstream, refused_port: int) -> None:
    with forward_gateway(upstream, f"http://127.0.0.1:{refused_port}/verify") as g:
        start = time.monotonic()
        r = httpx.get(g.url + V1 + "whoami", headers={"cookie": SESSION}, timeout=10)
        err = error_of(r, 502, "forward_auth_unavailable")
        assert time.monotonic() - start < 3
        assert "forward auth service" in err["message"] and "alice" not in err["message"]


def test_slow_auth_service_is_504_within_the_timeout(upstream: MockUpstream, auth_server: AuthServer) -> None:
    with forward_gateway(upstream, auth_server.url, timeout=0.5) as g:
        start = time.monotonic()
        r = httpx.get(g.url + V1 + "whoami", headers={"cookie": "sess=slow"}, timeout=10)
        took = time.monotonic() - start
        err = error_of(r, 504, "forward_auth_timeout")
        assert 0.45 <= took < 3, took
        assert "0.5s" in err["message"]
        auth_server.release.set()
        # The gateway is not stuck: the next request is asked about and let in.
        r = httpx.get(g.url + V1 + "whoami", headers={"cookie": SESSION}, timeout=10)
        assert r.status_code == 200 and r.json()["actor"] == "forward-auth:alice", r.text


def test_forward_auth_without_an_admin_token_enables_the_admin_api(upstream: MockUpstream,
                                                                   auth_server: AuthServer) -> None:
    """Forward auth alone is an opt-in: admin paths are no longer 403 admin_disabled."""
    with forward_gateway(upstream, auth_server.url) as g:
        assert g.gateway.config.admin.tokens == ()
        admitted(httpx.get(g.url + NOWHERE, headers={"cookie": SESSION}))
        # ...and the chat API is untouched by it: no auth service call, the gateway key as always.
        assert httpx.post(g.url + CHAT, headers=bearer(GATEWAY_KEY), json=CHAT_BODY).status_code == 200
        assert httpx.post(g.url + CHAT, headers={"cookie": SESSION}, json=CHAT_BODY).status_code == 401
        assert len(auth_server.seen) == 1


# -- CSRF: with forward auth the browser's cookie authenticates whatever a page makes it send ----------------

JSON_CT = {"content-type": "application/json"}
CROSS_SITE = [  # (headers beside the cookie, body): what pages of other sites can make a browser send
    pytest.param({"sec-fetch-site": "cross-site", **JSON_CT}, b"{}", id="sec-fetch-cross-site"),
    pytest.param({"sec-fetch-site": "same-site", **JSON_CT}, b"{}", id="sec-fetch-same-site-sibling-host"),
    pytest.param({"origin": "https://evil.example", **JSON_CT}, b"{}", id="origin-other-host"),
    pytest.param({"origin": "null", **JSON_CT}, b"{}", id="origin-null-sandboxed"),
    pytest.param({"origin": "https://evil.example", "sec-fetch-site": "cross-site", "content-type": "text/plain"},
                 b'{"name":"csrf","metadata":{"a":"=x"}}\r\n', id="text-plain-form"),
]


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
@pytest.mark.parametrize("headers, body", CROSS_SITE)
def test_cross_site_writes_are_403_before_any_handler(upstream: MockUpstream, auth_server: AuthServer,
                                                      method: str, headers: dict[str, str], body: bytes) -> None:
    with forward_gateway(upstream, auth_server.url) as g:
        r = httpx.request(method, g.url + V1 + "whoami", content=body, headers={"cookie": SESSION, **headers})
        err = error_of(r, 403, "cross_site_request")
        assert "evil" not in err["message"]


SAME_SITE = [  # what the dashboard on the gateway's own origin, a typed URL, or a script sends: let in
    pytest.param({"sec-fetch-site": "same-origin"}, id="sec-fetch-same-origin"),
    pytest.param({"sec-fetch-site": "none"}, id="sec-fetch-none-user-initiated"),
    pytest.param({"origin": "ORIGIN"}, id="origin-this-host"),
    pytest.param({"origin": "https://gw.example.org", "x-forwarded-host": "gw.example.org"},
                 id="origin-the-proxys-host"),
    pytest.param({"sec-fetch-site": "same-origin", "origin": "https://gw.example.org"},
                 id="sec-fetch-decides-over-a-rewritten-host"),
    pytest.param({}, id="a-script"),
]


@pytest.mark.parametrize("headers", SAME_SITE)
def test_same_origin_and_script_writes_are_let_in(upstream: MockUpstream, auth_server: AuthServer,
                                                  headers: dict[str, str]) -> None:
    with forward_gateway(upstream, auth_server.url) as g:
        headers = {k: g.url if v == "ORIGIN" else v for k, v in headers.items()}
        r = httpx.post(g.url + V1 + "whoami", content=b"{}", headers={"cookie": SESSION, **JSON_CT, **headers})
        assert r.status_code == 200 and r.json()["actor"] == "forward-auth:alice", r.text


def test_reads_are_not_refused_cross_site(upstream: MockUpstream, auth_server: AuthServer) -> None:
    """A page of another site cannot read the answer (no CORS on the admin API): a GET changes nothing."""
    with forward_gateway(upstream, auth_server.url) as g:
        r = httpx.get(g.url + V1 + "whoami", headers={"cookie": SESSION, "sec-fetch-site": "cross-site",
                                                      "origin": "https://evil.example"})
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("ctype", [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                   "application/jsonp", "text/json"])
def test_a_body_that_is_not_sent_as_json_is_415(tmp_path: Path, upstream: MockUpstream, ctype: str | None) -> None:
    """curl -d sends application/x-www-form-urlencoded unless told: the admin token's scripts too must say JSON
    (README: -H 'content-type: application/json'). Nothing is written."""
    with run_live(live_config(tmp_path, upstream, admin_token=ADMIN)) as g:
        headers = {**bearer(ADMIN), **({"content-type": ctype} if ctype else {})}
        r = httpx.post(g.url + V1 + "clients", content=b'{"name": "app"}', headers=headers)
        error_of(r, 415, "unsupported_media_type")
        for ok_type in ("application/json", "application/json; charset=utf-8", "Application/JSON"):
            r = httpx.post(g.url + V1 + "clients", content=b'{"name": "app"}',
                           headers={**bearer(ADMIN), "content-type": ok_type})
            assert r.status_code == 201, r.text
        # no body, no content type needed (POST clients/{id}/rotate, POST reload, DELETE)
        assert httpx.post(g.url + V1 + "reload", headers=bearer(ADMIN)).status_code != 415
        conn = db.connect(str(tmp_path / "gw.db"))
        try:
            assert len(KeyStore(conn).list()) == 3
        finally:
            conn.close()


def test_a_cross_site_form_changes_nothing_in_the_database(tmp_path: Path, upstream: MockUpstream,
                                                           auth_server: AuthServer) -> None:
    """The reviewer's probe: <form method=post enctype=text/plain> on another site, the SSO cookie attached,
    aimed at clients, routes and rotate-key. Every one is refused and the database has no row of them."""
    store = {"path": str(tmp_path / "gw.db"), "encryption_key": "the operator's passphrase!"}
    with run_live(base_config(upstream.url, admin=forward_auth(auth_server.url), store=store)) as g:
        form = {"cookie": SESSION, "content-type": "text/plain", "origin": "https://evil.example",
                "sec-fetch-site": "cross-site", "sec-fetch-mode": "navigate"}
        for path, body in (("clients", b'{"name":"csrf","metadata":{"a":"=x"}}\r\n'),
                           ("rotate-key", b'{"encryption_key":"known-to-the-attacker-=x"}\r\n'),
                           ("routes", b'{"name":"demo","steps":[{"provider":"echo","model":"hijacked=x"}]}\r\n')):
            error_of(httpx.post(g.url + V1 + path, content=body, headers=form), 403, "cross_site_request")
        conn = db.connect(str(tmp_path / "gw.db"))
        try:
            assert conn.execute("SELECT count(*) FROM audit_log").fetchone() == (0,)
            assert conn.execute("SELECT count(*) FROM routes").fetchone() == (0,)
        finally:
            conn.close()
