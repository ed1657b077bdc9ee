"""The dashboard's server side over real sockets (``run_live``: a real sqlite file): its page and files, login and
logout, the session cookie opening the admin API, CSRF on writes, failed logins limited per address.

Asserted: cookie attributes (HttpOnly, SameSite=Strict, Path, Max-Age, Secure with TLS or behind an HTTPS
proxy); the session refused once expired, forged, signed by a token no longer configured, or logged out (in
another gateway on the same database too: what another worker sees); writes with the cookie need
``X-CSRF-Token`` (missing, wrong, right), tokens need none; the 11th failed login in a minute is a 429 even for
the right token, and the window passes on the injected clock; wrong admin credentials counted together at every
door that takes one (the login, the admin API's Bearer, /metrics' Bearer and Basic; a Bearer forward auth admits
is not a guess), each door then a 429; no sessions at all with ``workers > 1`` and an in-memory store (409
``sessions_need_a_store``); the security headers on every answer of the page's door and of the admin API
(errors, the CSV and a handler's bug included); no path traversal (raw request targets, encoded variants);
``base_path``; files read through importlib.resources from a zip as from a directory.
"""

from __future__ import annotations

import base64
import http.client
import re
import ssl
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from at_gateway.admin import dashboard
from at_gateway.admin.auth import csrf_of, session_key, sign_session
from at_gateway.admin.dashboard import CSP, load_files
from tests.conftest import GATEWAY_KEY, RunningGateway, base_config, run_live
from tests.mock_upstream import MockUpstream, Reply

ADMIN = "adm-" + "e5" * 16
ADMIN2 = "adm-" + "f6" * 16
V1 = "/admin/api/v1/"
COOKIE_RE = re.compile(r"^([A-Za-z0-9_-]{22})\.(\d+)\.([A-Za-z0-9_-]{43})$")
SECURITY = {"content-security-policy": CSP.decode(), "x-frame-options": "DENY", "x-content-type-options": "nosniff",
            "referrer-policy": "no-referrer"}
STATIC = Path(dashboard.__file__).parent / "static"


def config(tmp_path: Path, upstream: MockUpstream, **top: Any) -> dict[str, Any]:
    top.setdefault("admin_token", ADMIN)
    return base_config(upstream.url, store={"path": str(tmp_path / "gw.db")}, **top)


@pytest.fixture
def gw(tmp_path: Path, upstream: MockUpstream) -> Iterator[RunningGateway]:
    with run_live(config(tmp_path, upstream)) as g:
        yield g


def parse_set_cookie(value: str) -> tuple[str, str, dict[str, str]]:
    """``name``, ``value`` and the attributes (lowercase names; a flag's value is "")."""
    first, *attrs = [p.strip() for p in value.split(";")]
    name, _, val = first.partition("=")
    out = {}
    for a in attrs:
        k, _, v = a.partition("=")
        out[k.lower()] = v
    return name, val, out


def set_cookies(r: httpx.Response) -> dict[str, tuple[str, dict[str, str]]]:
    return {name: (val, attrs) for name, val, attrs in map(parse_set_cookie, r.headers.get_list("set-cookie"))}


def login(g: RunningGateway, token: str = ADMIN, base: str = "", **headers: str) -> httpx.Response:
    return httpx.post(f"{g.url}{base}/admin/login", json={"token": token}, headers=headers, timeout=10)


class Browser:
    """What a browser holds after a login: the two cookies, sent back as a Cookie header."""

    def __init__(self, g: RunningGateway, base: str = "") -> None:
        r = login(g, base=base)
        assert r.status_code == 204, r.text
        got = set_cookies(r)
        self.g = g
        self.base = base
        self.session = got["atg_session"][0]
        self.csrf = got["atg_csrf"][0]

    def cookie(self, session: str | None = None, csrf: str | None = None) -> str:
        return f"atg_session={session or self.session}; atg_csrf={csrf or self.csrf}"

    def call(self, method: str, path: str, body: Any = None, *, csrf: str | None = None,
             cookie: str | None = None) -> httpx.Response:
        headers = {"cookie": cookie or self.cookie()}
        if csrf is not None:
            headers["x-csrf-token"] = csrf
        return httpx.request(method, f"{self.g.url}{self.base}{V1}{path}", json=body, headers=headers, timeout=10)


def error_code(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert err["message"] and err["type"], err
    return str(err["code"])


def security_headers_of(r: httpx.Response | http.client.HTTPResponse) -> dict[str, str | None]:
    return {k: r.headers.get(k) for k in SECURITY}


# -- login ----------------------------------------------------------------------------------------------------

def test_login_sets_the_session_and_csrf_cookies(gw: RunningGateway) -> None:
    before = time.time()
    r = login(gw)
    assert r.status_code == 204 and r.content == b""
    assert r.headers["cache-control"] == "no-store" and security_headers_of(r) == SECURITY
    got = set_cookies(r)
    assert set(got) == {"atg_session", "atg_csrf"}
    value, attrs = got["atg_session"]
    m = COOKIE_RE.match(value)
    assert m, value
    assert before + 12 * 3600 - 1 <= int(m[2]) <= time.time() + 12 * 3600  # admin.session_ttl: 12 h by default
    assert attrs.keys() == {"max-age", "httponly", "samesite", "path"}  # no Secure without TLS
    assert attrs["samesite"] == "Strict" and attrs["path"] == "/admin/"
    assert 12 * 3600 - 2 <= int(attrs["max-age"]) <= 12 * 3600
    csrf, cattrs = got["atg_csrf"]
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", csrf) and csrf not in value
    assert cattrs.keys() == {"max-age", "samesite", "path"}  # readable by the page: not HttpOnly
    assert cattrs["path"] == "/admin/" and cattrs["samesite"] == "Strict"
    assert ADMIN not in r.headers.get("set-cookie", "") and ADMIN not in gw.logs.getvalue()
    assert login(gw).headers["set-cookie"] != r.headers["set-cookie"], "a new session id each time"


def test_the_session_opens_the_admin_api_and_says_who_and_until_when(gw: RunningGateway) -> None:
    b = Browser(gw)
    r = b.call("GET", "session")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body == {"object": "session", "actor": "session:token0", "expires_at": int(b.session.split(".")[1])}
    assert b.call("GET", "clients").status_code == 200
    assert b.call("GET", "health").status_code == 200
    # An admin token still works, and says it is no session.
    r = httpx.get(gw.url + V1 + "session", headers={"authorization": f"Bearer {ADMIN}"})
    assert r.json() == {"object": "session", "actor": "token0", "expires_at": None}
    # Without either: 401.
    assert error_code(httpx.get(gw.url + V1 + "session"), 401) == "invalid_admin_token"
    # The audit log has the login, never the token.
    audit = httpx.get(gw.url + V1 + "audit", headers={"authorization": f"Bearer {ADMIN}"}).json()["data"]
    assert [(a["actor"], a["action"]) for a in audit] == [("session:token0", "session.login")]
    assert ADMIN not in str(audit)


@pytest.mark.parametrize(("body", "headers", "status", "code"), [
    ({"token": "adm-" + "0" * 32}, {}, 401, "invalid_admin_token"),
    ({"token": GATEWAY_KEY}, {}, 401, "invalid_admin_token"),  # a gateway key is no admin token
    ({"token": ADMIN[:-1]}, {}, 401, "invalid_admin_token"),
    ({"token": ""}, {}, 400, "invalid_fields"),
    ({"token": 5}, {}, 400, "invalid_fields"),
    ({}, {}, 400, "invalid_fields"),
    ([ADMIN], {}, 400, "invalid_json"),
    ({"token": ADMIN, "remember": True}, {}, 400, "invalid_fields"),
    ({"token": ADMIN}, {"sec-fetch-site": "cross-site"}, 403, "cross_site_request"),
    ({"token": ADMIN}, {"origin": "https://evil.example"}, 403, "cross_site_request"),
], ids=["wrong", "gateway-key", "prefix", "empty", "not-a-string", "no-token", "not-an-object", "unknown-field",
        "cross-site", "other-origin"])
def test_a_refused_login_sets_no_cookie(gw: RunningGateway, body: dict[str, Any], headers: dict[str, str],
                                        status: int, code: str) -> None:
    r = httpx.post(gw.url + "/admin/login", json=body, headers=headers)
    assert error_code(r, status) == code
    assert "set-cookie" not in r.headers and security_headers_of(r) == SECURITY
    assert ADMIN not in r.text


def test_login_wants_a_json_post(gw: RunningGateway) -> None:
    r = httpx.post(gw.url + "/admin/login", content=f"token={ADMIN}",
                   headers={"content-type": "application/x-www-form-urlencoded"})
    assert error_code(r, 415) == "unsupported_media_type"
    r = httpx.get(gw.url + "/admin/login")
    assert error_code(r, 405) == "method_not_allowed" and r.headers["allow"] == "POST"


def test_without_admin_tokens_there_is_no_login(tmp_path: Path, upstream: MockUpstream) -> None:
    """Forward auth only: the proxy in front signs people in; the page still loads, login says why not."""
    cfg = config(tmp_path, upstream, admin_token=None,
                 admin={"forward_auth": {"address": "http://127.0.0.1:9/verify"}})
    del cfg["admin_token"]
    with run_live(cfg) as g:
        assert error_code(login(g), 403) == "login_unavailable"


# -- failed logins are limited per address --------------------------------------------------------------------

def test_the_eleventh_failed_login_in_a_minute_is_429_even_with_the_right_token(gw: RunningGateway) -> None:
    now = [1000.0]
    services = gw.gateway.services
    services.clock = lambda: now[0]  # the limiter's clock: services.clock, injected
    for _ in range(10):
        assert error_code(login(gw, "adm-wrong-" + "x" * 30), 401) == "invalid_admin_token"
        now[0] += 1.0
    for token in ("adm-wrong-" + "x" * 30, ADMIN):
        r = login(gw, token)
        assert error_code(r, 429) == "too_many_logins"
        assert 1 <= int(r.headers["retry-after"]) <= 51 and "set-cookie" not in r.headers
    now[0] = 1000.0 + 60.0  # the first failure leaves the window: one more try
    assert login(gw).status_code == 204
    assert error_code(login(gw, "adm-wrong-" + "x" * 30), 401) == "invalid_admin_token"
    assert error_code(login(gw), 429) == "too_many_logins"  # ten failures in the window again
    now[0] += 3600
    assert login(gw).status_code == 204


METRICS_PASSWORD = "metrics-pass-0123456789"
WRONG = "adm-wrong-" + "x" * 30


def basic(user: str, password: str) -> dict[str, str]:
    return {"authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def door_call(g: RunningGateway, door: str, right: bool) -> httpx.Response:
    """One credential at one door: the right one, or a wrong guess."""
    token = ADMIN if right else WRONG
    if door == "login":
        return login(g, token)
    if door == "admin API bearer":
        return httpx.get(g.url + V1 + "session", headers={"authorization": f"Bearer {token}"}, timeout=10)
    if door == "metrics bearer":
        return httpx.get(g.url + "/metrics", headers={"authorization": f"Bearer {token}"}, timeout=10)
    assert door == "metrics basic"
    return httpx.get(g.url + "/metrics", headers=basic("prom", METRICS_PASSWORD if right else WRONG), timeout=10)


DOORS = ["login", "admin API bearer", "metrics bearer", "metrics basic"]
TOO_MANY = {"login": "too_many_logins"}  # the login's code is older than the others' (too_many_failures)


@pytest.fixture
def doors(tmp_path: Path, upstream: MockUpstream) -> Iterator[tuple[RunningGateway, list[float]]]:
    """A gateway whose admin token opens the login, the admin API and /metrics (which takes a Basic password too),
    on an injected clock (the limiter's: ``services.clock``)."""
    cfg = config(tmp_path, upstream, metrics={"enabled": True, "username": "prom", "password": METRICS_PASSWORD})
    with run_live(cfg) as g:
        now = [1000.0]
        g.gateway.services.clock = lambda: now[0]
        yield g, now


@pytest.mark.parametrize("guessed_at", DOORS)
def test_wrong_admin_credentials_count_at_every_door_and_lock_every_door(
        doors: tuple[RunningGateway, list[float]], guessed_at: str) -> None:
    g, now = doors
    b = Browser(g)  # a session opened before the guesses: not a credential guess, it keeps working
    for _ in range(10):
        r = door_call(g, guessed_at, right=False)
        assert r.status_code == 401, (guessed_at, r.text)
        now[0] += 1.0
    for door in DOORS:  # the right credential at every door: 429 until the first guess leaves the window
        r = door_call(g, door, right=True)
        assert error_code(r, 429) == TOO_MANY.get(door, "too_many_failures"), door
        assert 1 <= int(r.headers["retry-after"]) <= 51 and "set-cookie" not in r.headers
        assert r.json()["error"]["type"] == "rate_limit_error" and ADMIN not in r.text
    assert b.call("GET", "session").status_code == 200
    now[0] = 1000.0 + 60.0
    for door in DOORS:
        assert door_call(g, door, right=True).status_code in (200, 204), door


def test_guesses_spread_over_the_doors_count_together_and_no_credential_is_no_guess(
        doors: tuple[RunningGateway, list[float]]) -> None:
    g, now = doors
    for _ in range(20):  # nothing presented: a 401, never counted
        assert error_code(httpx.get(g.url + V1 + "session", timeout=10), 401) == "invalid_admin_token"
        assert error_code(httpx.get(g.url + "/metrics", timeout=10), 401) == "metrics_unauthorized"
    assert door_call(g, "admin API bearer", right=True).status_code == 200
    for i in range(10):  # the guesses of one attacker, spread over the four doors
        assert door_call(g, DOORS[i % 4], right=False).status_code == 401
    for door in DOORS:
        assert door_call(g, door, right=True).status_code == 429, door
    now[0] += 61.0
    assert door_call(g, "metrics basic", right=True).status_code == 200


def test_a_bearer_that_forward_auth_admits_is_no_guess_one_it_refuses_is(tmp_path: Path, upstream: MockUpstream,
                                                                         other: MockUpstream) -> None:
    """With forward auth a Bearer that is not an admin token may be the SSO's own: counted only when the auth
    service refuses it too."""
    other.replies["/verify"] = lambda rec: Reply(
        status=200 if rec.headers.get("authorization") == "Bearer sso-token-of-alice" else 401)
    cfg = config(tmp_path, upstream, admin={"forward_auth": {"address": other.url + "/verify"}})
    with run_live(cfg) as g:
        g.gateway.services.clock = lambda: 1000.0

        def session(token: str) -> httpx.Response:
            return httpx.get(g.url + V1 + "session", headers={"authorization": f"Bearer {token}"}, timeout=10)

        for _ in range(15):
            assert session("sso-token-of-alice").json()["actor"] == "forward-auth"
        for _ in range(10):
            assert error_code(session(WRONG), 401) == "forward_auth_denied"
        assert error_code(session(ADMIN), 429) == "too_many_failures"
        assert error_code(session("sso-token-of-alice"), 429) == "too_many_failures"


def test_with_workers_and_a_memory_store_there_are_no_dashboard_sessions(upstream: MockUpstream) -> None:
    """A logout is remembered in the one process that saw it; with several workers the others would keep
    accepting the cookie. So: no login, no session cookie; the Bearer token works."""
    with run_live(base_config(upstream.url, admin_token=ADMIN, workers=2)) as g:
        r = login(g)
        assert error_code(r, 409) == "sessions_need_a_store" and "set-cookie" not in r.headers
        message = r.json()["error"]["message"]
        assert "store.path" in message and "Bearer" in message
        assert security_headers_of(r) == SECURITY
        valid = sign_session(session_key(ADMIN), "B" * 22, int(time.time()) + 3600)  # as a login would have made
        r = httpx.get(g.url + V1 + "session", headers={"cookie": f"atg_session={valid}"}, timeout=10)
        assert error_code(r, 409) == "sessions_need_a_store"
        r = httpx.get(g.url + V1 + "session", headers={"authorization": f"Bearer {ADMIN}"}, timeout=10)
        assert r.status_code == 200 and r.json()["actor"] == "token0"


# -- CSRF -----------------------------------------------------------------------------------------------------

def test_writes_with_the_cookie_need_the_csrf_header(gw: RunningGateway) -> None:
    b = Browser(gw)
    new = {"name": "from-the-page"}
    assert error_code(b.call("POST", "clients", new), 403) == "csrf_failed"  # missing
    assert error_code(b.call("POST", "clients", new, csrf="x" * 43), 403) == "csrf_failed"  # wrong
    assert error_code(b.call("POST", "clients", new, csrf=b.csrf[::-1]), 403) == "csrf_failed"
    # The header equal to a cookie a sibling site planted is not enough: the value is bound to the session.
    planted = "y" * 43
    assert error_code(b.call("POST", "clients", new, csrf=planted, cookie=b.cookie(csrf=planted)), 403) == \
        "csrf_failed"
    # The right one, and the csrf cookie missing: refused too.
    assert error_code(b.call("POST", "clients", new, csrf=b.csrf, cookie=f"atg_session={b.session}"), 403) == \
        "csrf_failed"
    r = b.call("POST", "clients", new, csrf=b.csrf)
    assert r.status_code == 201, r.text
    key_id = r.json()["id"]
    for method, path, body in (("PATCH", f"clients/{key_id}", {"name": "renamed"}),
                               ("DELETE", f"clients/{key_id}", None)):
        assert error_code(b.call(method, path, body), 403) == "csrf_failed"
        assert b.call(method, path, body, csrf=b.csrf).status_code == 200
    # Reads need none; the same-origin rules still hold for writes.
    assert b.call("GET", "clients").status_code == 200
    r = httpx.post(gw.url + V1 + "clients", json=new, headers={
        "cookie": b.cookie(), "x-csrf-token": b.csrf, "sec-fetch-site": "cross-site"})
    assert error_code(r, 403) == "cross_site_request"
    # Scripts with the token need no CSRF header.
    r = httpx.post(gw.url + V1 + "clients", json=new, headers={"authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 201
    actors = [a["actor"] for a in httpx.get(gw.url + V1 + "audit", params={"action": "client.create"},
                                            headers={"authorization": f"Bearer {ADMIN}"}).json()["data"]]
    assert actors == ["token0", "session:token0"]


# -- expiry, forgery, rotation, logout ---------------------------------------------------------------------

def forged(token: str, expires_at: int, sid: str = "A" * 22) -> str:
    key = session_key(token)
    return f"atg_session={sign_session(key, sid, expires_at)}; atg_csrf={csrf_of(key, sid)}"


def test_expired_forged_and_foreign_sessions_are_refused(gw: RunningGateway) -> None:
    b = Browser(gw)
    now = int(time.time())
    cases = {
        "expired": (forged(ADMIN, now - 1), "session_expired"),
        "beyond-the-ttl": (forged(ADMIN, now + 12 * 3600 + 3600), "invalid_session"),
        "another-token": (forged(ADMIN2, now + 600), "invalid_session"),
        "garbage": ("atg_session=garbage", "invalid_session"),
        "tampered-expiry": (b.cookie(session=b.session.replace(b.session.split(".")[1], str(now + 7200))),
                            "invalid_session"),
        "tampered-mac": (b.cookie(session=b.session[:-1] + ("A" if b.session[-1] != "A" else "B")),
                         "invalid_session"),
    }
    for name, (cookie, code) in cases.items():
        r = b.call("GET", "session", cookie=cookie)
        assert error_code(r, 401) == code, name
    # A session signed with the right token's key and not yet expired is what login gives: accepted.
    assert b.call("GET", "session", cookie=forged(ADMIN, now + 600)).json()["actor"] == "session:token0"
    # A stale cookie of another path before the valid one: the valid one counts.
    assert b.call("GET", "session", cookie=f"atg_session=garbage; {b.cookie()}").status_code == 200


def test_a_tiny_ttl_gives_a_short_session(tmp_path: Path, upstream: MockUpstream) -> None:
    with run_live(config(tmp_path, upstream, admin={"session_ttl": 90})) as g:
        r = login(g)
        _, attrs = set_cookies(r)["atg_session"]
        assert 88 <= int(attrs["max-age"]) <= 90
        # A cookie of a longer ttl (the ttl was lowered since) ends now.
        b = Browser(g)
        assert error_code(b.call("GET", "session", cookie=forged(ADMIN, int(time.time()) + 3600)), 401) == \
            "invalid_session"


def test_removing_the_token_ends_its_sessions(tmp_path: Path, upstream: MockUpstream) -> None:
    with run_live(config(tmp_path, upstream, admin_token=None, admin_tokens=[ADMIN, ADMIN2])) as g:
        second = Browser(g)
        r = login(g, ADMIN2)
        assert r.status_code == 204
        cookie = "; ".join(f"{k}={v}" for k, (v, _) in set_cookies(r).items())
        assert second.call("GET", "session", cookie=cookie).json()["actor"] == "session:token1"
    with run_live(config(tmp_path, upstream, admin_token=ADMIN2)) as g:  # ADMIN rotated out
        b = Browser.__new__(Browser)
        b.g, b.base = g, ""
        assert error_code(b.call("GET", "session", cookie=second.cookie()), 401) == "invalid_session"
        assert b.call("GET", "session", cookie=cookie).json()["actor"] == "session:token0"  # now the first token


def test_logout_clears_the_cookies_and_ends_the_session_in_every_worker(tmp_path: Path,
                                                                      upstream: MockUpstream) -> None:
    """Two gateways on one database file, as two workers are: a session made by one is accepted by the other
    (nothing shared but the configuration), and a logout in one is refused by both."""
    with ExitStack() as stack:
        one = stack.enter_context(run_live(config(tmp_path, upstream)))
        two = stack.enter_context(run_live(config(tmp_path, upstream)))
        b = Browser(one)
        other = Browser.__new__(Browser)
        other.g, other.base, other.session, other.csrf = two, "", b.session, b.csrf
        assert other.call("GET", "session").status_code == 200
        keep = Browser(one)  # another session: untouched by the logout
        r = httpx.post(one.url + "/admin/logout", headers={"cookie": b.cookie()})
        assert r.status_code == 204 and security_headers_of(r) == SECURITY
        got = set_cookies(r)
        assert got["atg_session"][0] == "" and got["atg_session"][1]["max-age"] == "0"
        assert got["atg_csrf"][0] == "" and got["atg_csrf"][1]["max-age"] == "0"
        assert got["atg_session"][1]["path"] == "/admin/" and "httponly" in got["atg_session"][1]
        assert error_code(b.call("GET", "session"), 401) == "invalid_session"
        assert error_code(other.call("GET", "session"), 401) == "invalid_session"
        assert error_code(b.call("POST", "clients", {"name": "x"}, csrf=b.csrf), 401) == "invalid_session"
        assert keep.call("GET", "session").status_code == 200
        # Logging out again, or without a session at all, is still 204 with the cookies cleared.
        for headers in ({"cookie": b.cookie()}, {}):
            r = httpx.post(one.url + "/admin/logout", headers=headers)
            assert r.status_code == 204 and len(r.headers.get_list("set-cookie")) == 2
        assert error_code(httpx.post(one.url + "/admin/logout", headers={"sec-fetch-site": "cross-site"}), 403) == \
            "cross_site_request"
        assert error_code(httpx.get(one.url + "/admin/logout"), 405) == "method_not_allowed"


def test_a_memory_store_revokes_in_this_process(upstream: MockUpstream) -> None:
    with run_live(base_config(upstream.url, admin_token=ADMIN)) as g:
        b = Browser(g)
        assert b.call("GET", "session").status_code == 200
        assert httpx.post(g.url + "/admin/logout", headers={"cookie": b.cookie()}).status_code == 204
        assert error_code(b.call("GET", "session"), 401) == "invalid_session"


# -- Secure cookies ---------------------------------------------------------------------------------------------

def test_cookies_are_secure_with_tls_and_behind_an_https_proxy(tmp_path: Path, upstream: MockUpstream) -> None:
    from tests.test_tls import self_signed

    cert, key = self_signed(tmp_path)
    with run_live(config(tmp_path, upstream, tls={"cert_file": str(cert), "key_file": str(key)})) as g:
        ctx = ssl.create_default_context(cafile=str(cert))
        r = httpx.post(f"https://localhost:{g.port}/admin/login", json={"token": ADMIN}, verify=ctx)
        assert r.status_code == 204
        assert all("secure" in attrs for _, attrs in set_cookies(r).values())
    with run_live(config(tmp_path, upstream)) as g:
        r = login(g, **{"x-forwarded-proto": "https"})
        assert all("secure" in attrs for _, attrs in set_cookies(r).values())
        assert not any("secure" in attrs for _, attrs in set_cookies(login(g)).values())


# -- the page's files and headers ---------------------------------------------------------------------------------

def raw_get(g: RunningGateway, target: str, method: str = "GET",
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """A request whose target goes out exactly as given (httpx would normalize ``..``)."""
    conn = http.client.HTTPConnection("127.0.0.1", g.port, timeout=10)
    try:
        conn.request(method, target, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


PAGE_ANSWERS = [
    ("GET", "/admin", 308), ("HEAD", "/admin", 308), ("GET", "/admin/", 200), ("HEAD", "/admin/", 200),
    ("GET", "/admin/static/app.js", 200), ("GET", "/admin/static/app.css", 200),
    ("GET", "/admin/static/nope.js", 404), ("GET", "/admin/nothing", 404), ("PUT", "/admin/", 405),
    ("POST", "/admin/static/app.js", 405), ("GET", "/admin/login", 405), ("POST", "/admin/logout", 204),
    ("GET", "/admin/static/", 404),
]


@pytest.mark.parametrize(("method", "target", "status"), PAGE_ANSWERS, ids=[f"{m} {t}" for m, t, _ in PAGE_ANSWERS])
def test_every_answer_of_the_page_carries_the_security_headers(gw: RunningGateway, method: str, target: str,
                                                               status: int) -> None:
    got, headers, body = raw_get(gw, target, method)
    assert got == status, (got, body[:200])
    assert {k: headers.get(k) for k in SECURITY} == SECURITY
    if status >= 400:
        assert headers["cache-control"] == "no-store"
        if method != "HEAD":
            assert b'"error"' in body
    if target == "/admin":
        assert headers["location"] == "/admin/"


API_SECURITY = {"x-frame-options": "DENY", "x-content-type-options": "nosniff", "referrer-policy": "no-referrer"}
BEARER = {"authorization": f"Bearer {ADMIN}"}
API_ANSWERS = [  # (method, path below /admin/api/, headers, body, status)
    ("GET", "v1/session", BEARER, None, 200),
    ("GET", "v1/usage?format=csv", BEARER, None, 200),
    ("GET", "v1/session", {}, None, 401),
    ("GET", "v1/session", {"authorization": f"Bearer {WRONG}"}, None, 401),
    ("GET", "v1/session", {"cookie": "atg_session=forged"}, None, 401),
    ("POST", "v1/clients", {"cookie": "__SESSION__"}, b'{"name": "x"}', 403),  # no X-CSRF-Token
    ("POST", "v1/clients", {**BEARER, "content-type": "text/plain"}, b'{"name": "x"}', 415),
    ("GET", "v1/clients?limit=zero", BEARER, None, 400),
    ("GET", "v1/nothing-here", BEARER, None, 404),
    ("GET", "v2/session", BEARER, None, 404),
    ("DELETE", "v1/session", BEARER, None, 405),
    ("POST", "v1/clients", {**BEARER, "content-type": "application/json"}, b"{" * 2_000_000, 413),
]


@pytest.mark.parametrize(("method", "path", "headers", "body", "status"), API_ANSWERS,
                         ids=[f"{a[0]} {a[1]} {a[4]}" for a in API_ANSWERS])
def test_every_answer_of_the_admin_api_carries_the_security_headers(gw: RunningGateway, method: str, path: str,
                                                                    headers: dict[str, str], body: bytes | None,
                                                                    status: int) -> None:
    if headers.get("cookie") == "__SESSION__":
        headers = {"cookie": Browser(gw).cookie(), "content-type": "application/json"}
    r = httpx.request(method, f"{gw.url}/admin/api/{path}", headers=headers, content=body, timeout=10)
    assert r.status_code == status, r.text[:300]
    assert {k: r.headers.get(k) for k in API_SECURITY} == API_SECURITY
    csp = r.headers.get("content-security-policy", "")
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert r.headers["cache-control"] == "no-store"
    if status >= 400:
        assert r.json()["error"]["code"]
    elif "csv" in path:
        assert r.headers["content-type"].startswith("text/csv")


def test_a_handlers_bug_is_a_500_with_the_security_headers_and_a_logged_traceback(gw: RunningGateway) -> None:
    async def broken(req: Any) -> Any:
        raise RuntimeError("a bug in a handler")

    gw.live.gateway._admin.routes.append(("GET", ("broken",), broken))  # type: ignore[attr-defined]
    r = httpx.get(gw.url + V1 + "broken", headers=BEARER, timeout=10)
    assert error_code(r, 500) == "internal_error" and "a bug" not in r.text
    assert {k: r.headers.get(k) for k in API_SECURITY} == API_SECURITY
    assert "RuntimeError: a bug in a handler" in gw.logs.getvalue()


def test_a_too_many_guesses_answer_carries_the_security_headers(doors: tuple[RunningGateway, list[float]]) -> None:
    g, _ = doors
    for _ in range(10):
        door_call(g, "admin API bearer", right=False)
    r = door_call(g, "admin API bearer", right=True)
    assert r.status_code == 429 and {k: r.headers.get(k) for k in API_SECURITY} == API_SECURITY


def test_the_page_and_its_files_are_served_as_they_are_in_the_package(gw: RunningGateway) -> None:
    files = sorted(p for p in STATIC.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not (STATIC / "index.html").is_file():
        pytest.fail("at_gateway/admin/static/index.html is missing (the page is helper G2's)")
    status, headers, body = raw_get(gw, "/admin/")
    assert status == 200 and body == (STATIC / "index.html").read_bytes()
    assert headers["content-type"] == "text/html; charset=utf-8" and headers["cache-control"] == "no-store"
    types = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml",
             ".html": "text/html; charset=utf-8", ".png": "image/png"}
    for path in files:
        name = path.relative_to(STATIC).as_posix()
        status, headers, body = raw_get(gw, f"/admin/static/{name}")
        assert status == 200 and body == path.read_bytes(), name
        if path.suffix in types:
            assert headers["content-type"] == types[path.suffix], name
        if path.suffix != ".html":
            assert headers["cache-control"] == "no-cache" and headers["etag"].startswith('"'), name
            again, h2, b2 = raw_get(gw, f"/admin/static/{name}", headers={"if-none-match": headers["etag"]})
            assert again == 304 and b2 == b"" and h2["etag"] == headers["etag"], name
            assert raw_get(gw, f"/admin/static/{name}", headers={"if-none-match": '"other"'})[0] == 200


TRAVERSALS = [
    "/admin/static/../api.py", "/admin/static/../../admin/api.py", "/admin/static/..%2Fapi.py",
    "/admin/static/%2e%2e/api.py", "/admin/static/%2E%2E%2Fapi.py", "/admin/static/..%5Capi.py",
    "/admin/static/..\\api.py", "/admin/static//etc/passwd", "/admin/static/%2Fetc%2Fpasswd",
    "/admin/static/./index.html", "/admin/static/app.js%00", "/admin/static/app.js/", "/admin/static/.%2e/api.py",
    "/admin/static/%252e%252e/api.py", "/admin/../admin/api.py", "/admin/static/__init__.py",
    "/admin/static/../../../../etc/passwd", "/admin/%2e%2e/api.py",
]


@pytest.mark.parametrize("target", TRAVERSALS)
def test_no_path_traversal(gw: RunningGateway, target: str) -> None:
    status, headers, body = raw_get(gw, target)
    assert status == 404, (status, body[:200])
    assert b"import" not in body and b"root:" not in body
    assert headers["content-type"].startswith("application/json")


def test_base_path(tmp_path: Path, upstream: MockUpstream) -> None:
    with run_live(config(tmp_path, upstream, base_path="/llm")) as g:
        status, headers, _ = raw_get(g, "/llm/admin")
        assert status == 308 and headers["location"] == "/llm/admin/"
        assert raw_get(g, "/llm/admin/")[0] == 200
        assert raw_get(g, "/llm/admin/static/app.js")[0] == 200
        assert raw_get(g, "/admin/")[0] == 404  # outside the base path
        r = login(g, base="/llm")
        assert r.status_code == 204
        assert {attrs["path"] for _, attrs in set_cookies(r).values()} == {"/llm/admin/"}
        b = Browser(g, base="/llm")
        assert b.call("GET", "session").json()["actor"] == "session:token0"
        assert b.call("POST", "clients", {"name": "x"}, csrf=b.csrf).status_code == 201


# -- files from a zip (the .pyz) ------------------------------------------------------------------------------------

def test_the_files_load_from_a_zip_as_from_a_directory(tmp_path: Path) -> None:
    archive = tmp_path / "pkg.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("zpkg_dash/__init__.py", "")
        z.writestr("zpkg_dash/static/index.html", "<!doctype html><title>t</title>")
        z.writestr("zpkg_dash/static/app.js", "console.log(1)")
        z.writestr("zpkg_dash/static/img/logo.svg", "<svg/>")
        z.writestr("zpkg_dash/static/.hidden", "x")
    sys.path.insert(0, str(archive))
    try:
        files = load_files("zpkg_dash", "static")
    finally:
        sys.path.remove(str(archive))
        sys.modules.pop("zpkg_dash", None)
    assert sorted(files) == ["app.js", "img/logo.svg", "index.html"]
    assert files["app.js"].body == b"console.log(1)"
    assert files["app.js"].content_type == b"text/javascript; charset=utf-8"
    assert files["img/logo.svg"].content_type == b"image/svg+xml" and files["index.html"].html
    assert load_files("zpkg_no_such_package", "static") == {}


def test_the_packages_own_files_load_from_a_zip_of_the_package(tmp_path: Path) -> None:
    """at_gateway itself zipped as the .pyz holds it (build_zipapp.package_files: every file of the package),
    imported from the zip in a fresh interpreter: the page's files are found there."""
    root = Path(dashboard.__file__).parents[2]
    archive = tmp_path / "at_gateway.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted((root / "at_gateway").rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc", ".pyo"):
                z.write(path, path.relative_to(root).as_posix())
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from at_gateway.admin import dashboard as d; "
            "assert d.__file__.startswith(sys.argv[1]), d.__file__; "
            "print(sorted(d.load_files()))")
    out = subprocess.run([sys.executable, "-I", "-c", code, str(archive)], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    want = sorted(p.relative_to(STATIC).as_posix() for p in STATIC.rglob("*")
                  if p.is_file() and not p.name.startswith("."))
    assert out.stdout.strip() == str(want) and "index.html" in want
