"""Our HTTP/1.1 server, spoken to over raw sockets: framing, limits, timeouts, disconnects."""

from __future__ import annotations

import json
import re
import resource
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import GATEWAY_KEY, RunningGateway, base_config, run_gateway
from tests.mock_upstream import MockUpstream, Reply, stream_of, wait_until

CHAT = json.dumps({"model": "demo", "messages": [{"role": "user", "content": "ping pong"}]}).encode()


def chat_request(extra: bytes = b"", body: bytes = CHAT) -> bytes:
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Api-Key: " + GATEWAY_KEY.encode() +
            b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n" % len(body) + extra + b"\r\n" + body)


@contextmanager
def connect(gw: RunningGateway, timeout: float = 5.0) -> Iterator[socket.socket]:
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=timeout)
    try:
        yield s
    finally:
        s.close()


def read_response(s: socket.socket, buf: bytearray) -> tuple[int, dict[str, str], bytes]:
    """Read one Content-Length-framed response from the socket (leaving the rest in buf)."""
    while b"\r\n\r\n" not in buf:
        data = s.recv(65536)
        if not data:
            raise EOFError(bytes(buf))
        buf += data
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
    n = int(headers.get("content-length", 0))
    while len(rest) < n:
        data = s.recv(65536)
        if not data:
            raise EOFError
        rest += data
    buf[:] = rest[n:]
    return status, headers, rest[:n]


def closed_by_peer(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


@pytest.fixture
def gw(upstream: MockUpstream) -> Iterator[RunningGateway]:
    with run_gateway(base_config(upstream.url, max_body_size=2048, header_timeout="1s", keepalive_timeout="1s",
                                 max_connections=3)) as g:
        yield g


def test_keep_alive_serves_many_requests_on_one_connection(gw: RunningGateway) -> None:
    with connect(gw) as s:
        buf = bytearray()
        for _ in range(3):
            s.sendall(chat_request())
            status, headers, body = read_response(s, buf)
            assert status == 200
            assert json.loads(body)["choices"][0]["message"]["content"] == "ping pong"


def test_pipelined_requests_answered_in_order(gw: RunningGateway) -> None:
    with connect(gw) as s:
        s.sendall(chat_request(b"X-Request-Id: one\r\n") + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" +
                  chat_request(b"X-Request-Id: three\r\n"))
        buf = bytearray()
        r1, r2, r3 = (read_response(s, buf) for _ in range(3))
        assert r1[1]["x-request-id"] == "one" and r1[0] == 200
        assert r2[2] == b'{"status":"healthy"}'
        assert r3[1]["x-request-id"] == "three"


def test_connection_close_is_honoured_for_post(gw: RunningGateway) -> None:
    with connect(gw) as s:
        s.sendall(chat_request(b"Connection: close\r\n"))
        status, headers, _ = read_response(s, bytearray())
        assert status == 200 and headers.get("connection") == "close"
        assert closed_by_peer(s)


def test_http10_closes(gw: RunningGateway) -> None:
    with connect(gw) as s:
        s.sendall(b"GET /health HTTP/1.0\r\n\r\n")
        status, _, body = read_response(s, bytearray())
        assert status == 200 and closed_by_peer(s)


def test_head_request_is_answered_with_a_head_only(gw: RunningGateway) -> None:
    """An answer to HEAD carries no body (h11 refuses one): the head is sent and the connection lives on."""
    with connect(gw) as s:
        s.sendall(b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\n")
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = s.recv(65536)
            assert data, buf
            buf += data
        head, _, rest = buf.partition(b"\r\n\r\n")
        assert head.split(b" ")[1] in (b"200", b"405") and b"content-length: " in head.lower() and rest == b""
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, body = read_response(s, bytearray())
        assert status == 200 and body == b'{"status":"healthy"}'
    assert "unhandled error" not in gw.logs.getvalue()


def test_expect_100_continue(gw: RunningGateway) -> None:
    with connect(gw) as s:
        req = chat_request(b"Expect: 100-continue\r\n")
        head, body = req.split(b"\r\n\r\n", 1)
        s.sendall(head + b"\r\n\r\n")
        interim = s.recv(4096)
        assert interim.startswith(b"HTTP/1.1 100 ")
        s.sendall(body)
        status, _, _ = read_response(s, bytearray())
        assert status == 200


def test_expect_100_continue_with_too_large_body_is_413_without_reading(gw: RunningGateway) -> None:
    with connect(gw) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 999999\r\n"
                  b"Expect: 100-continue\r\n\r\n")
        status, headers, body = read_response(s, bytearray())
        assert status == 413
        assert json.loads(body)["error"]["code"] == "request_too_large"


def test_body_over_limit_is_413(gw: RunningGateway) -> None:
    big = b'{"model":"demo","messages":[{"role":"user","content":"' + b"x" * 4000 + b'"}]}'
    r = httpx.post(gw.url + "/v1/chat/completions", headers={"x-api-key": GATEWAY_KEY}, content=big)
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
    # chunked, so the size is only known while reading
    with connect(gw) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(5):
            s.sendall(b"400\r\n" + b"y" * 1024 + b"\r\n")
        status, _, _ = read_response(s, bytearray())
        assert status == 413


def test_head_over_64k_is_431(gw: RunningGateway) -> None:
    with connect(gw) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n")
        status, _, body = read_response(s, bytearray())
        assert status == 431
        assert "error" in json.loads(body)


def test_malformed_request_is_400(gw: RunningGateway) -> None:
    with connect(gw) as s:
        s.sendall(b"THIS IS NOT HTTP\r\n\r\n")
        status, headers, body = read_response(s, bytearray())
        assert status == 400 and json.loads(body)["error"]["code"] == "bad_request"
        assert len(headers["x-request-id"]) == 24  # even the server's own protocol errors carry one


def test_slow_head_gets_408_and_close(gw: RunningGateway) -> None:
    with connect(gw) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # never finished
        status, _, _ = read_response(s, bytearray())
        assert status == 408
        assert closed_by_peer(s)


@pytest.mark.parametrize("first", [b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n",  # the fast path
                                   b"GET /health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"])
def test_idle_keep_alive_connection_is_closed(gw: RunningGateway, first: bytes) -> None:
    with connect(gw) as s:
        s.sendall(first)
        read_response(s, bytearray())
        assert closed_by_peer(s)  # after keepalive_timeout (1s) with nothing sent


def test_pipelining_after_the_h11_path_took_over(gw: RunningGateway) -> None:
    """A chunked request moves the connection to h11; requests pipelined behind it are answered in order."""
    chunked = chat_request(b"Transfer-Encoding: chunked\r\n", body=b"").replace(b"Content-Length: 0\r\n", b"")
    chunked += b"%x\r\n%s\r\n0\r\n\r\n" % (len(CHAT), CHAT)
    with connect(gw) as s:
        s.sendall(chunked + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" + chat_request(b"X-Request-Id: three\r\n"))
        buf = bytearray()
        r1, r2, r3 = (read_response(s, buf) for _ in range(3))
        assert r1[0] == 200 and json.loads(r1[2])["choices"][0]["message"]["content"] == "ping pong"
        assert r2[2] == b'{"status":"healthy"}'
        assert r3[1]["x-request-id"] == "three"


def test_connection_cap(gw: RunningGateway) -> None:
    """Connections in the middle of a request (here: of its body) count against max_connections; idle
    keep-alive ones make room for a newcomer instead (tests/test_server_limits.py)."""
    conns = [socket.create_connection(("127.0.0.1", gw.port), timeout=5) for _ in range(3)]
    try:
        for c in conns:  # each is accepted and served
            c.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response(c, bytearray())[0] == 200
            c.sendall(chat_request()[:-5])  # and busy again: the body is not complete
        assert wait_until(lambda: gw.server.idle_connections == 0)  # the server saw them busy
        extra = socket.create_connection(("127.0.0.1", gw.port), timeout=0.5)
        extra.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        with pytest.raises(TimeoutError):
            extra.recv(1)  # waits in the backlog: the cap is reached
        conns.pop().close()
        extra.settimeout(5)
        assert read_response(extra, bytearray())[0] == 200
        extra.close()
    finally:
        for c in conns:
            c.close()


@pytest.mark.parametrize(("method", "path", "status", "allow"), [
    ("GET", "/v1/chat/completions", 405, "POST"),
    ("DELETE", "/v1/models", 405, "GET, HEAD"),
    ("GET", "/nope", 404, None),
    ("POST", "/v2/whatever", 404, None),
])
def test_unknown_path_and_wrong_method(gw: RunningGateway, method: str, path: str, status: int,
                                       allow: str | None) -> None:
    r = httpx.request(method, gw.url + path, headers={"x-api-key": GATEWAY_KEY})
    assert r.status_code == status
    assert set(r.json()["error"]) >= {"message", "type", "code"}
    assert r.headers.get("allow") == allow


@pytest.mark.parametrize("headers", [{}, {"x-api-key": "wrong"}, {"authorization": "Bearer wrong"},
                                     {"authorization": "Basic " + GATEWAY_KEY}])
def test_auth_failures_are_401(gw: RunningGateway, headers: dict[str, str]) -> None:
    for req in (("GET", "/v1/models", None), ("POST", "/v1/chat/completions", CHAT)):
        r = httpx.request(req[0], gw.url + req[1], headers=headers, content=req[2])
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"


def test_health_needs_no_auth_and_models_lists_routes(gw: RunningGateway) -> None:
    assert httpx.get(gw.url + "/health").json() == {"status": "healthy"}
    models = httpx.get(gw.url + "/v1/models", headers={"authorization": f"Bearer {GATEWAY_KEY}"}).json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["demo"]
    assert GATEWAY_KEY not in json.dumps(models)


def test_models_empty_list_is_not_null(upstream: MockUpstream) -> None:
    cfg = base_config(upstream.url)
    cfg["routes"] = []
    with run_gateway(cfg) as g:
        assert httpx.get(g.url + "/v1/models", headers={"x-api-key": GATEWAY_KEY}).json()["data"] == []


@pytest.mark.parametrize(("body", "code"), [
    (b"{not json", "invalid_json"),
    (b"[1, 2]", "invalid_json"),
    (b'{"messages": [{"role": "user", "content": "x"}]}', "missing_model"),
    (b'{"model": "demo"}', "invalid_messages"),
    (b'{"model": "demo", "messages": [{"role":"user","content":"x"}], "stream": "yes"}', "invalid_stream"),
    (b"\xff\xfe", "invalid_json"),
])
def test_bad_chat_bodies_are_400(gw: RunningGateway, body: bytes, code: str) -> None:
    r = httpx.post(gw.url + "/v1/chat/completions", headers={"x-api-key": GATEWAY_KEY}, content=body)
    assert r.status_code == 400
    assert r.json()["error"]["code"] == code


def test_client_disconnect_cancels_upstream_stream(upstream: MockUpstream) -> None:
    upstream.replies["slow"] = Reply(sse=stream_of(*["w"] * 200), sse_delay=0.05)
    route = [{"name": "r", "steps": [{"provider": "up1", "model": "slow"}]}]
    with run_gateway(base_config(upstream.url, route)) as g:
        body = json.dumps({"model": "r", "stream": True, "messages": [{"role": "user", "content": "x"}]}).encode()
        with connect(g) as s:
            s.sendall(chat_request(body=body))
            data = b""
            while b"data:" not in data:
                data += s.recv(4096)
            assert g.gateway.client.stats()["active"] == 1
        # The client is gone: the upstream request is cancelled and its connection closed, not pooled.
        assert wait_until(lambda: g.gateway.client.stats() == {"active": 0, "idle": 0}), g.gateway.client.stats()
        line = g.request_logs()[-1]
        assert line["status"] == 200 and line["stream"] is True


def test_shutdown_closes_idle_connections_and_cuts_streams_at_shutdown_timeout(upstream: MockUpstream) -> None:
    upstream.replies["slow"] = Reply(sse=stream_of(*["w"] * 200), sse_delay=0.05)  # ~10 s in all
    route = [{"name": "r", "steps": [{"provider": "up1", "model": "slow"}]}]
    cfg = base_config(upstream.url, route, shutdown_timeout="0.3s", keepalive_timeout="60s")
    with run_gateway(cfg) as g:
        body = json.dumps({"model": "r", "stream": True, "messages": [{"role": "user", "content": "x"}]}).encode()
        with connect(g) as idle, connect(g) as streaming:
            idle.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response(idle, bytearray())[0] == 200
            streaming.sendall(chat_request(body=body))
            data = b""
            while b"data:" not in data:
                data += streaming.recv(4096)
            g.portal.call(g.server.shutdown)
            assert closed_by_peer(idle)  # at once: waiting for keepalive_timeout would hit the 5 s socket timeout

            def refused() -> bool:
                try:
                    socket.create_connection(("127.0.0.1", g.port), timeout=1).close()
                    return False
                except (ConnectionRefusedError, ConnectionResetError):  # reset: caught in the closing backlog
                    return True

            assert wait_until(refused)  # no longer accepting
            try:
                while chunk := streaming.recv(65536):  # cut at shutdown_timeout, long before the stream's end
                    data += chunk
            except ConnectionResetError:
                pass  # cut by an abort (RST) rather than a FIN: cut all the same
            assert b"[DONE]" not in data and not data.endswith(b"0\r\n\r\n")  # truncated, not finished
        assert "shutdown timeout reached" in g.logs.getvalue()


def test_running_out_of_file_descriptors_does_not_stop_the_server(tmp_path: Path) -> None:
    """accept() failing with EMFILE (more clients than the descriptor limit) is waited out: the gateway
    keeps its listener and serves again once descriptors are free (it used to exit)."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(base_config("http://127.0.0.1:9")))
    log_path = tmp_path / "stderr.log"

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))

    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "at_gateway", "serve", "--config", str(path), "--port", "0"],
                                stderr=log, preexec_fn=low_limit)
    clients: list[socket.socket] = []
    try:
        assert wait_until(lambda: "listening on" in log_path.read_text() or proc.poll() is not None, 15)
        port = int(re.search(r"listening on [^:]+:(\d+)", log_path.read_text()).group(1))  # type: ignore[union-attr]
        for _ in range(200):  # more than 128 descriptors' worth: the kernel queues them, accept() fails
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        assert wait_until(lambda: "cannot accept" in log_path.read_text() or proc.poll() is not None)
        assert proc.poll() is None, log_path.read_text()
        for c in clients:
            c.close()
        clients.clear()
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).json() == {"status": "healthy"}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert "Traceback" not in log_path.read_text()
    finally:
        for c in clients:
            c.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
