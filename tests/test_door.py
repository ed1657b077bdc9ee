"""The client-facing door: body decoding, authentication wording and precedence, the models endpoints,
HEAD, and CORS, all over real sockets against a real mock upstream."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from at_gateway.app import MAX_JSON_DEPTH
from tests.conftest import GATEWAY_KEY, RunningGateway, base_config, run_gateway
from tests.mock_upstream import MockUpstream, Reply, stream_of

ROUTES = [
    {"name": "r", "steps": [{"provider": "up1", "model": "first"}, {"provider": "up2", "model": "second"}]},
    {"name": "demo", "steps": [{"provider": "echo", "model": "echo-1"}]},
    {"name": "openai/gpt-4o", "steps": [{"provider": "echo", "model": "echo-1"}]},
]
KEY = {"x-api-key": GATEWAY_KEY}
CHAT_PATH = "/v1/chat/completions"
APP = "https://app.example"


@pytest.fixture
def door(upstream: MockUpstream) -> Iterator[RunningGateway]:
    with run_gateway(base_config(upstream.url, ROUTES)) as g:
        yield g


def chat(content: str = "hi", model: str = "r") -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": content}]}).encode()


def error_lines(gw: RunningGateway) -> list[str]:
    return [ln for ln in gw.log_lines() if json.loads(ln).get("level") in ("error", "critical")]


def assert_openai_error(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "code"} and err["code"] == code, err
    assert err["type"] == "invalid_request_error" and isinstance(err["message"], str) and err["message"]
    return err


# -- point 3: every body that cannot be decoded is 400 invalid_json ------------------------------

DEEP = 100_000
_MSG_HEAD = b'{"model":"r","messages":[{"role":"user","content":'


def _nested_content(levels: int) -> bytes:
    """A chat body whose total nesting is ``levels`` + 3 (object, messages array, message object)."""
    return _MSG_HEAD + b"[" * levels + b"]" * levels + b"}]}"


UNDECODABLE = {
    "deep-arrays": b"[" * DEEP + b"]" * DEEP,
    "deep-objects": b'{"a":' * DEEP + b"1" + b"}" * DEEP,
    "deep-unclosed": b"[" * DEEP,
    "deep-in-a-message": _nested_content(DEEP),
    # Shallow enough to decode at the door, too deep for the encoders further down the stack.
    "decodes-but-deeper-than-the-limit": _nested_content(MAX_JSON_DEPTH),
    "decodes-but-near-the-recursion-limit": _nested_content(900),
    "mixed-deep-objects-and-arrays": b'{"model":"r","messages":' + b'[{"a":' * 600 + b"1" + b"}]" * 600 + b"}",
    "invalid-utf8": _MSG_HEAD + b'"caf\xc3"}]}',
    "latin1-byte": _MSG_HEAD + b'"caf\xe9"}]}',
    "utf8-encoded-surrogate": _MSG_HEAD + b'"\xed\xa0\x80"}]}',
    "lone-bom": b"\xef\xbb\xbf",
    "bom-then-garbage": b"\xef\xbb\xbf{nope",
    "utf16-bom-odd-length": b"\xff\xfe{\x00}",
    "empty": b"",
    "nul": b"\x00",
    "truncated": b'{"model":"r","messages":[',
    "nan": _MSG_HEAD + b'"x"}],"temperature":NaN}',
    "infinity": _MSG_HEAD + b'"x"}],"temperature":-Infinity}',
    "float overflow": _MSG_HEAD + b'"x"}],"temperature":1e999}',  # float("1e999") is inf: sent as Infinity
    "negative float overflow": _MSG_HEAD + b'"x"}],"top_p":-2.5e400}',
    "huge-integer": _MSG_HEAD + b'"x"}],"seed":' + b"7" * 5000 + b"}",
    "trailing-garbage": chat() + b"}",
}


@pytest.mark.parametrize("name", sorted(UNDECODABLE))
def test_undecodable_bodies_are_400_invalid_json(door: RunningGateway, upstream: MockUpstream, name: str) -> None:
    r = httpx.post(door.url + CHAT_PATH, headers=KEY, content=UNDECODABLE[name], timeout=20)
    assert_openai_error(r, 400, "invalid_json")
    assert upstream.received == []
    assert door.request_logs()[-1]["status"] == 400
    assert error_lines(door) == []


def test_nesting_up_to_the_limit_passes_through(door: RunningGateway, upstream: MockUpstream) -> None:
    body = _nested_content(MAX_JSON_DEPTH - 3)
    r = httpx.post(door.url + CHAT_PATH, headers=KEY, content=body)
    assert r.status_code == 200, r.text
    assert len(upstream.received) == 1
    content = upstream.received[0].json["messages"][0]["content"]
    depth = 0
    while isinstance(content, list):
        depth += 1
        content = content[0] if content else None
    assert depth == MAX_JSON_DEPTH - 3


def test_many_brackets_that_are_not_deep_pass(door: RunningGateway, upstream: MockUpstream) -> None:
    """Lots of containers (a long conversation) and brackets inside strings are not nesting."""
    messages = [{"role": "user", "content": [{"type": "text", "text": "[[[{{{" * 50}]} for _ in range(300)]
    r = httpx.post(door.url + CHAT_PATH, headers=KEY, json={"model": "r", "messages": messages})
    assert r.status_code == 200, r.text
    assert len(upstream.received[0].json["messages"]) == 300


def test_a_utf8_bom_before_the_body_is_accepted(door: RunningGateway) -> None:
    r = httpx.post(door.url + CHAT_PATH, headers=KEY, content=b"\xef\xbb\xbf" + chat("bom", "demo"))
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "bom"


# -- point 4: lone surrogates are refused before any step runs ------------------------------------

LONE_SURROGATES = {
    "high": _MSG_HEAD + b'"a\\ud800b"}]}',
    "low": _MSG_HEAD + b'"a\\udc00b"}]}',
    "upper-case": _MSG_HEAD + b'"\\uD83D"}]}',
    "reversed-pair": _MSG_HEAD + b'"\\ude00\\ud83d"}]}',
    "high-then-text": _MSG_HEAD + b'"\\ud83dx"}]}',
    "at-the-end": _MSG_HEAD + b'"ok \\ud83d"}]}',
    "in-a-key": b'{"model":"r","messages":[{"role":"user","content":"x","\\udbff":1}]}',
    "in-the-model": b'{"model":"r\\ud800","messages":[{"role":"user","content":"x"}]}',
    "escaped-backslash-then-lone": _MSG_HEAD + b'"\\\\\\ud800"}]}',
}


@pytest.mark.parametrize("name", sorted(LONE_SURROGATES))
def test_lone_surrogate_is_400_and_no_step_runs(door: RunningGateway, upstream: MockUpstream, name: str) -> None:
    r = httpx.post(door.url + CHAT_PATH, headers=KEY, content=LONE_SURROGATES[name])
    err = assert_openai_error(r, 400, "invalid_json")
    assert "surrogate" in err["message"]
    assert upstream.received == []
    line = door.request_logs()[-1]
    assert line["status"] == 400 and "attempts" not in line
    assert error_lines(door) == []


@pytest.mark.parametrize(("raw", "expected"), [
    (b'"\\ud83d\\ude00 ok"', "\U0001f600 ok"),  # an emoji written as a surrogate pair
    (b'"\\uD83D\\uDE00"', "\U0001f600"),
    (b'"\\udbff\\udfff"', "\U0010ffff"),
    (b'"\\\\ud800"', "\\ud800"),  # an escaped backslash: the text \ud800, not a surrogate
    (b'"\\ud7ff \\ue000"', "\ud7ff \ue000"),  # just outside the surrogate range
])
def test_surrogate_pairs_and_lookalikes_pass(door: RunningGateway, upstream: MockUpstream, raw: bytes,
                                              expected: str) -> None:
    r = httpx.post(door.url + CHAT_PATH, headers=KEY, content=_MSG_HEAD + raw + b"}]}")
    assert r.status_code == 200, r.text
    assert upstream.received[0].json["messages"][0]["content"] == expected


# -- point 14: GET /v1/models/{id} ----------------------------------------------------------------

def sdk(gw: RunningGateway, key: str = GATEWAY_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=10)


def test_models_retrieve_and_list_with_the_openai_sdk(door: RunningGateway) -> None:
    client = sdk(door)
    listed = {m.id: m for m in client.models.list()}
    assert set(listed) == {"r", "demo", "openai/gpt-4o"}
    for name in listed:
        got = client.models.retrieve(name)
        assert got.id == name and got.object == "model" and got.owned_by == "at-gateway"
        assert got.model_dump() == listed[name].model_dump()
    with pytest.raises(openai.NotFoundError) as exc:
        client.models.retrieve("nope")
    assert exc.value.code == "model_not_found"
    assert exc.value.body["type"] == "invalid_request_error"  # type: ignore[index]


@pytest.mark.parametrize("path", ["/v1/models/openai/gpt-4o", "/v1/models/openai%2Fgpt-4o", "/models/openai%2fgpt-4o",
                                  "/v1/models/openai%2Fgpt-4o?x=1"])
def test_model_ids_with_slashes_and_percent_encoding(door: RunningGateway, path: str) -> None:
    r = httpx.get(door.url + path, headers=KEY)
    assert r.status_code == 200 and r.json()["id"] == "openai/gpt-4o"


@pytest.mark.parametrize("path", ["/v1/models/", "/v1/models/nope", "/models/demo%2F", "/v1/models/%ff",
                                  "/v1/models/demo/"])
def test_unknown_model_id_is_404_model_not_found(door: RunningGateway, path: str) -> None:
    assert_openai_error(httpx.get(door.url + path, headers=KEY), 404, "model_not_found")


def test_model_retrieve_needs_the_key_and_get(door: RunningGateway) -> None:
    assert_openai_error(httpx.get(door.url + "/v1/models/demo"), 401, "invalid_api_key")
    assert_openai_error(httpx.get(door.url + "/v1/models/nope"), 401, "invalid_api_key")  # no probing unauthenticated
    r = httpx.post(door.url + "/v1/models/demo", headers=KEY)
    assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD"


# -- point 15: OpenAI's 401 wording ---------------------------------------------------------------

@pytest.mark.parametrize(("headers", "start"), [
    ({"x-api-key": "wrong-key-value"}, "Incorrect API key provided"),
    ({"authorization": "Bearer wrong-key-value"}, "Incorrect API key provided"),
    ({}, "You didn't provide an API key"),
    ({"authorization": "Basic " + GATEWAY_KEY}, "You didn't provide an API key"),
    ({"authorization": "Bearer"}, "You didn't provide an API key"),
])
def test_401_messages_use_openais_wording(door: RunningGateway, headers: dict[str, str], start: str) -> None:
    for method, path, body in (("GET", "/v1/models", None), ("POST", CHAT_PATH, chat())):
        r = httpx.request(method, door.url + path, headers=headers, content=body)
        err = assert_openai_error(r, 401, "invalid_api_key")
        assert err["message"].startswith(start), err
        assert "wrong-key-value" not in r.text and GATEWAY_KEY not in r.text
        assert r.headers["www-authenticate"].startswith("Bearer")


def test_openai_sdk_sees_an_authentication_error(door: RunningGateway) -> None:
    with pytest.raises(openai.AuthenticationError) as exc:
        sdk(door, "wrong").models.list()
    assert exc.value.code == "invalid_api_key" and "Incorrect API key provided" in exc.value.message


# -- point 18: which key header wins --------------------------------------------------------------

@pytest.mark.parametrize(("headers", "status"), [
    ({"x-api-key": GATEWAY_KEY, "authorization": "Bearer wrong"}, 200),
    ({"x-api-key": "wrong", "authorization": f"Bearer {GATEWAY_KEY}"}, 401),
    ({"x-api-key": "", "authorization": f"Bearer {GATEWAY_KEY}"}, 200),  # an empty X-Api-Key counts as absent
    ({"authorization": f"bearer {GATEWAY_KEY}"}, 200),
])
def test_x_api_key_wins_over_authorization(door: RunningGateway, headers: dict[str, str], status: int) -> None:
    assert httpx.get(door.url + "/v1/models", headers=headers).status_code == status
    assert httpx.post(door.url + CHAT_PATH, headers=headers, content=chat(model="demo")).status_code == status


# -- point 16: HEAD -------------------------------------------------------------------------------

@pytest.mark.parametrize(("path", "headers"), [
    ("/health", {}), ("/v1/models", KEY), ("/models", KEY), ("/v1/models/demo", KEY),
    ("/v1/models/openai%2Fgpt-4o", KEY),
])
def test_head_is_get_without_a_body(door: RunningGateway, path: str, headers: dict[str, str]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", door.port, timeout=5)
    try:
        conn.request("GET", path, headers=headers)
        get = conn.getresponse()
        get_body = get.read()
        conn.request("HEAD", path, headers=headers)
        head = conn.getresponse()
        assert head.status == 200 and head.read() == b""
        assert head.getheader("content-length") == str(len(get_body))
        assert head.getheader("content-type") == "application/json"
        assert head.getheader("x-request-id")
        conn.request("GET", "/health")  # the connection is still in step: no stray body bytes were sent
        again = conn.getresponse()
        assert again.status == 200 and again.read() == b'{"status":"healthy"}'
    finally:
        conn.close()
    assert error_lines(door) == []


def test_head_raw_bytes_have_no_body(door: RunningGateway) -> None:
    with socket.create_connection(("127.0.0.1", door.port), timeout=5) as s:
        s.sendall(b"HEAD /v1/models HTTP/1.1\r\nHost: x\r\nX-Api-Key: " + GATEWAY_KEY.encode() + b"\r\n\r\n"
                  b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while not data.endswith(b'{"status":"healthy"}'):
            chunk = s.recv(65536)
            assert chunk, data
            data += chunk
    first, _, rest = data.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200 ") and rest.startswith(b"HTTP/1.1 200 ")


@pytest.mark.parametrize(("method", "path", "allow"), [
    ("DELETE", "/health", "GET, HEAD"), ("POST", "/v1/models", "GET, HEAD"), ("PUT", "/models", "GET, HEAD"),
    ("HEAD", CHAT_PATH, "POST"), ("OPTIONS", "/v1/models", "GET, HEAD"), ("GET", "/chat/completions", "POST"),
])
def test_405_allow_lists_head(door: RunningGateway, method: str, path: str, allow: str) -> None:
    r = httpx.request(method, door.url + path, headers=KEY)
    assert r.status_code == 405 and r.headers["allow"] == allow
    assert "access-control-allow-origin" not in r.headers


# -- point 16: CORS -------------------------------------------------------------------------------

@pytest.fixture
def cors_gw(upstream: MockUpstream) -> Iterator[RunningGateway]:
    cfg = base_config(upstream.url, ROUTES, cors={"allow_origins": [APP, "https://Other.Example:8443"]})
    with run_gateway(cfg) as g:
        yield g


def preflight(gw: RunningGateway, path: str, origin: str, method: str = "POST") -> httpx.Response:
    return httpx.options(gw.url + path, headers={"origin": origin, "access-control-request-method": method,
                                                 "access-control-request-headers": "authorization, content-type"})


def cors_headers(r: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in r.headers.items() if k.startswith("access-control-")}


@pytest.mark.parametrize(("path", "method", "methods"), [
    (CHAT_PATH, "POST", "POST"), ("/chat/completions", "POST", "POST"), ("/v1/models", "GET", "GET, HEAD"),
    ("/v1/models/openai/gpt-4o", "GET", "GET, HEAD"), ("/health", "GET", "GET, HEAD"),
])
def test_preflight_from_an_allowed_origin(cors_gw: RunningGateway, path: str, method: str, methods: str) -> None:
    r = preflight(cors_gw, path, APP, method)  # no key: preflights carry no credentials
    assert r.status_code == 204 and r.content == b""
    assert cors_headers(r) == {
        "access-control-allow-origin": APP,
        "access-control-allow-methods": methods,
        "access-control-allow-headers": "authorization, content-type",  # what the preflight asked for
        "access-control-max-age": "600",
    }
    assert r.headers["vary"] == "Origin, Access-Control-Request-Headers" and r.headers["x-request-id"]
    assert "content-length" not in r.headers and "transfer-encoding" not in r.headers  # 204: no framing
    # Origins compare case-insensitively; the browser's spelling is echoed back.
    r2 = preflight(cors_gw, path, "https://other.example:8443", method)
    assert r2.status_code == 204 and r2.headers["access-control-allow-origin"] == "https://other.example:8443"


def test_preflight_allows_the_headers_an_sdk_asks_for(cors_gw: RunningGateway) -> None:
    """openai-node in a browser sends its x-stainless-* headers: a preflight must allow what it asks for."""
    asked = ("authorization,content-type,x-stainless-arch,x-stainless-lang,x-stainless-os,"
             "x-stainless-package-version,x-stainless-retry-count,x-stainless-runtime,x-stainless-runtime-version")
    r = httpx.options(cors_gw.url + CHAT_PATH, headers={"origin": APP, "access-control-request-method": "POST",
                                                        "access-control-request-headers": asked})
    assert r.status_code == 204 and r.headers["access-control-allow-headers"] == asked
    # A malformed list is not echoed (the browser then refuses, as it should).
    bad = httpx.options(cors_gw.url + CHAT_PATH, headers={"origin": APP, "access-control-request-method": "POST",
                                                          "access-control-request-headers": "x-a, (y)"})
    assert bad.status_code == 204 and "access-control-allow-headers" not in bad.headers


@pytest.mark.parametrize("origin", ["https://evil.example", "http://app.example", "https://app.example:444", "null"])
def test_preflight_from_another_origin_is_403_without_cors_headers(cors_gw: RunningGateway, origin: str) -> None:
    r = preflight(cors_gw, CHAT_PATH, origin)
    err = r.json()["error"]
    assert r.status_code == 403 and err["code"] == "origin_not_allowed" and err["type"] == "permission_error"
    assert cors_headers(r) == {} and r.headers["vary"] == "Origin"


@pytest.mark.parametrize("path", ["/admin/keys", "/nope", "/v1/assistants"])
def test_no_cors_outside_the_client_endpoints(cors_gw: RunningGateway, path: str) -> None:
    # /admin/...: the dashboard's paths, 403 admin_disabled here (no admin token); the others are unknown
    status = 403 if path.startswith("/admin/") else 404
    r = preflight(cors_gw, path, APP)
    assert r.status_code == status and cors_headers(r) == {} and "vary" not in r.headers
    r = httpx.get(cors_gw.url + path, headers={"origin": APP, **KEY})
    assert r.status_code == status and cors_headers(r) == {}


EXPOSED = "x-request-id, x-gateway-route, x-gateway-provider, x-gateway-model, x-gateway-attempts"


def assert_actual_cors(r: httpx.Response, origin: str = APP) -> None:
    assert r.headers["access-control-allow-origin"] == origin
    assert r.headers["access-control-expose-headers"] == EXPOSED
    assert r.headers["vary"] == "Origin"
    assert "access-control-allow-credentials" not in r.headers


def test_actual_responses_carry_cors_headers(cors_gw: RunningGateway, upstream: MockUpstream) -> None:
    h = {"origin": APP, **KEY}
    ok = httpx.post(cors_gw.url + CHAT_PATH, headers=h, content=chat())
    assert ok.status_code == 200 and ok.headers["x-gateway-route"] == "r"
    assert_actual_cors(ok)
    for r in (httpx.get(cors_gw.url + "/v1/models", headers=h), httpx.get(cors_gw.url + "/v1/models/demo", headers=h),
              httpx.get(cors_gw.url + "/health", headers={"origin": APP})):
        assert r.status_code == 200
        assert_actual_cors(r)
    # Error answers too: the browser can only read them with the headers.
    errors = [
        (httpx.post(cors_gw.url + CHAT_PATH, headers={"origin": APP}, content=chat()), 401),
        (httpx.post(cors_gw.url + CHAT_PATH, headers=h, content=b"{bad"), 400),
        (httpx.get(cors_gw.url + "/v1/models/nope", headers=h), 404),
        (httpx.get(cors_gw.url + CHAT_PATH, headers=h), 405),
    ]
    upstream.replies["first"] = upstream.replies["second"] = Reply(status=500, body={"error": {"message": "x"}})
    errors.append((httpx.post(cors_gw.url + CHAT_PATH, headers=h, content=chat()), 502))
    for r, status in errors:
        assert r.status_code == status
        assert_actual_cors(r)


def test_streamed_responses_carry_cors_headers(cors_gw: RunningGateway, upstream: MockUpstream) -> None:
    upstream.replies["first"] = Reply(sse=stream_of("a", "b"))
    body = json.dumps({"model": "r", "stream": True, "messages": [{"role": "user", "content": "x"}]})
    with httpx.stream("POST", cors_gw.url + CHAT_PATH, headers={"origin": APP, **KEY}, content=body) as r:
        assert r.status_code == 200 and r.headers["content-type"] == "text/event-stream"
        assert_actual_cors(r)
        text = r.read()
    assert text.endswith(b"data: [DONE]\n\n")
    # A stream whose every step failed before the first chunk: the 502 too.
    upstream.replies["first"] = upstream.replies["second"] = Reply(status=500, body={"error": {"message": "x"}})
    with httpx.stream("POST", cors_gw.url + CHAT_PATH, headers={"origin": APP, **KEY}, content=body) as r:
        assert r.status_code == 502
        assert_actual_cors(r)


def test_actual_request_from_another_origin_gets_no_allow_headers(cors_gw: RunningGateway) -> None:
    for h in ({"origin": "https://evil.example", **KEY}, KEY):
        r = httpx.get(cors_gw.url + "/v1/models", headers=h)
        assert r.status_code == 200 and cors_headers(r) == {} and r.headers["vary"] == "Origin"


def test_wildcard_and_credentials(upstream: MockUpstream) -> None:
    with run_gateway(base_config(upstream.url, ROUTES, cors={"allow_origins": ["*"], "max_age": 60,
                                                             "expose_headers": []})) as g:
        r = preflight(g, CHAT_PATH, "https://anyone.example")
        assert r.status_code == 204 and r.headers["access-control-allow-origin"] == "*"
        assert r.headers["access-control-max-age"] == "60"
        r = httpx.get(g.url + "/v1/models", headers={"origin": "https://anyone.example", **KEY})
        assert r.headers["access-control-allow-origin"] == "*" and "access-control-expose-headers" not in r.headers
    cors = {"allow_origins": [APP], "allow_credentials": True, "allow_headers": ["Authorization"],
            "expose_headers": ["X-Request-Id"]}
    cfg = base_config(upstream.url, ROUTES, cors=cors)
    with run_gateway(cfg) as g:
        r = preflight(g, CHAT_PATH, APP)
        assert r.headers["access-control-allow-origin"] == APP
        assert r.headers["access-control-allow-credentials"] == "true"
        assert r.headers["access-control-allow-headers"] == "authorization"
        r = httpx.post(g.url + CHAT_PATH, headers={"origin": APP, **KEY}, content=chat())
        assert r.headers["access-control-allow-origin"] == APP
        assert r.headers["access-control-allow-credentials"] == "true"
        assert r.headers["access-control-expose-headers"] == "x-request-id"


def test_cors_is_off_by_default(door: RunningGateway) -> None:
    r = preflight(door, CHAT_PATH, APP)
    assert r.status_code == 405 and cors_headers(r) == {} and "vary" not in r.headers
    for r in (httpx.post(door.url + CHAT_PATH, headers={"origin": APP, **KEY}, content=chat()),
              httpx.get(door.url + "/v1/models", headers={"origin": APP})):
        assert cors_headers(r) == {} and "vary" not in r.headers


def test_cors_preflight_raw_bytes(cors_gw: RunningGateway) -> None:
    """A 204 has no body and no framing headers; the connection stays usable."""
    with socket.create_connection(("127.0.0.1", cors_gw.port), timeout=5) as s:
        s.sendall(b"OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: x\r\nOrigin: " + APP.encode() +
                  b"\r\nAccess-Control-Request-Method: POST\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while not data.endswith(b'{"status":"healthy"}'):
            chunk = s.recv(65536)
            assert chunk, data
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 204 No Content\r\n") and rest.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"content-length" not in head.lower() and b"transfer-encoding" not in head.lower()

