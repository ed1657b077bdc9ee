"""`proxy:` for upstream connections: HTTP CONNECT and SOCKS5 proxies started here, on 127.0.0.1.

The proxies are small real servers in threads that record what they were asked
(tunnel target, credentials, SOCKS address type) and relay bytes to the mock
upstream, so every test checks the request really went through the proxy.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import select
import socket
import socketserver
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import openai
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from at_gateway.config import UpstreamConfig, build_config
from at_gateway.errors import ConfigError
from at_gateway.http.errors import ConnectError
from at_gateway.http.pool import UpstreamClient
from at_gateway.http.proxy import ProxyConnector, parse_proxy_url
from tests.conftest import GATEWAY_KEY, base_config, run_gateway
from tests.mock_upstream import MockUpstream, Reply, chat_completion, stream_of

USER, PASSWORD = "alice", "s3cret-p@ss:word"
QUOTED = "alice:s3cret-p%40ss%3Aword"  # the same, as written in a URL


# -- the proxies ---------------------------------------------------------------
@dataclass
class Tunnel:
    target: str  # host:port as asked
    auth: str | None = None  # HTTP: Proxy-Authorization; SOCKS: "user:password"
    atyp: int | None = None  # SOCKS address type: 1 IPv4, 3 name, 4 IPv6


@dataclass
class ProxyServer:
    kind: str  # "http" or "socks5"
    username: str | None = None
    password: str | None = None
    tls: ssl.SSLContext | None = None  # serve the proxy itself over TLS (https:// proxies)
    tunnels: list[Tunnel] = field(default_factory=list)
    relayed_down: int = 0  # bytes relayed from upstreams to clients (tests wait on it: the bytes are delivered)
    _socks: list[socket.socket] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> ProxyServer:
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                sock: socket.socket = self.request
                proxy._socks.append(sock)
                try:
                    if proxy.tls is not None:
                        sock = proxy.tls.wrap_socket(sock, server_side=True)
                        proxy._socks.append(sock)
                    upstream = proxy._http(sock) if proxy.kind == "http" else proxy._socks5(sock)
                    if upstream is not None:
                        proxy._socks.append(upstream)
                        _relay(sock, upstream, proxy._count_down)
                except (OSError, ValueError):
                    pass

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        # a short poll interval: shutdown() waits for it
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        for s in self._socks:
            try:
                s.close()
            except OSError:
                pass
        self._thread.join(5)

    def sockets(self) -> list[socket.socket]:
        return list(self._socks)

    def _count_down(self, n: int) -> None:
        with self._lock:
            self.relayed_down += n

    def url(self, scheme: str | None = None, creds: str | None = None) -> str:
        userinfo = f"{creds}@" if creds else ""
        return f"{scheme or self.kind}://{userinfo}127.0.0.1:{self.port}"

    # HTTP CONNECT (RFC 9110 9.3.6) with Basic proxy auth
    def _http(self, sock: socket.socket) -> socket.socket | None:
        head = b""
        while b"\r\n\r\n" not in head:
            data = sock.recv(4096)
            if not data:
                return None
            head += data
        lines = head.split(b"\r\n\r\n", 1)[0].decode().split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
        tunnel = Tunnel(target, headers.get("proxy-authorization"))
        self.tunnels.append(tunnel)
        if method != "CONNECT":
            sock.sendall(b"HTTP/1.1 405 Method Not Allowed\r\ncontent-length: 0\r\n\r\n")
            return None
        if self.username is not None:
            expected = "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
            if tunnel.auth != expected:
                sock.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                             b"proxy-authenticate: Basic realm=\"test\"\r\ncontent-length: 6\r\n\r\ndenied")
                return None
        host, port = target.rsplit(":", 1)
        try:
            upstream = socket.create_connection((host.strip("[]"), int(port)), timeout=5)
        except OSError:
            sock.sendall(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")
            return None
        sock.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        return upstream

    # SOCKS5 (RFC 1928) with username/password auth (RFC 1929)
    def _socks5(self, sock: socket.socket) -> socket.socket | None:
        version, n = _recv_exact(sock, 2)
        methods = _recv_exact(sock, n)
        assert version == 5
        auth = None
        if self.username is not None:
            if 2 not in methods:
                sock.sendall(b"\x05\xff")
                return None
            sock.sendall(b"\x05\x02")
            _, ulen = _recv_exact(sock, 2)
            user = _recv_exact(sock, ulen).decode()
            (plen,) = _recv_exact(sock, 1)
            password = _recv_exact(sock, plen).decode()
            auth = f"{user}:{password}"
            if (user, password) != (self.username, self.password):
                self.tunnels.append(Tunnel("", auth))
                sock.sendall(b"\x01\x01")
                return None
            sock.sendall(b"\x01\x00")
        else:
            sock.sendall(b"\x05\x00")
        _, cmd, _, atyp = _recv_exact(sock, 4)
        if atyp == 1:
            host = str(ipaddress.IPv4Address(_recv_exact(sock, 4)))
        elif atyp == 4:
            host = str(ipaddress.IPv6Address(_recv_exact(sock, 16)))
        else:
            (length,) = _recv_exact(sock, 1)
            host = _recv_exact(sock, length).decode()
        port = int.from_bytes(_recv_exact(sock, 2), "big")
        self.tunnels.append(Tunnel(f"{host}:{port}", auth, atyp))
        # Our upstreams listen on 127.0.0.1 only: any loopback address (::1 too) means it.
        addr = "127.0.0.1" if atyp == 3 or ipaddress.ip_address(host).is_loopback else host
        try:
            upstream = socket.create_connection((addr, port), timeout=5)
        except OSError:
            sock.sendall(b"\x05\x05\x00\x01\x00\x00\x00\x00\x00\x00")
            return None
        sock.sendall(b"\x05\x00\x00\x01\x7f\x00\x00\x01" + port.to_bytes(2, "big"))
        return upstream


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        data = sock.recv(n - len(buf))
        if not data:
            raise ValueError("peer closed")
        buf += data
    return buf


def _relay(a: socket.socket, b: socket.socket, count_down: Callable[[int], None]) -> None:
    """Copy bytes both ways until either side closes; ``count_down`` hears of each delivery from b to a."""
    a.settimeout(None)
    b.settimeout(None)
    try:
        while True:
            ready = [a] if isinstance(a, ssl.SSLSocket) and a.pending() else select.select([a, b], [], [], 30)[0]
            if not ready:
                return
            for src in ready:
                data = src.recv(65536)
                if not data:
                    return
                if src is a:
                    b.sendall(data)
                else:
                    a.sendall(data)
                    count_down(len(data))
    finally:
        for s in (a, b):
            try:
                s.close()
            except OSError:
                pass


@pytest.fixture
def http_proxy() -> Iterator[ProxyServer]:
    p = ProxyServer("http").start()
    yield p
    p.stop()


@pytest.fixture
def http_proxy_auth() -> Iterator[ProxyServer]:
    p = ProxyServer("http", USER, PASSWORD).start()
    yield p
    p.stop()


@pytest.fixture
def socks_proxy() -> Iterator[ProxyServer]:
    p = ProxyServer("socks5").start()
    yield p
    p.stop()


@pytest.fixture
def socks_proxy_auth() -> Iterator[ProxyServer]:
    p = ProxyServer("socks5", USER, PASSWORD).start()
    yield p
    p.stop()


def sdk(gw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=GATEWAY_KEY, max_retries=0, timeout=20)


def proxied_config(upstream_url: str, proxy: str, fallback: bool = False) -> dict[str, Any]:
    steps = [{"provider": "up1", "model": "m", "timeout": "10s"}]
    if fallback:
        steps.append({"provider": "up2", "model": "direct", "timeout": "10s"})
    cfg = base_config(upstream_url, [{"name": "r", "steps": steps}])
    cfg["providers"][0]["proxy"] = proxy
    return cfg


# -- through the gateway, with the openai SDK ------------------------------------
@pytest.mark.parametrize(("kind", "scheme", "auth"), [
    ("http", "http", False), ("http", "http", True),
    ("socks5", "socks5", False), ("socks5", "socks5", True),
    ("socks5", "socks5h", False), ("socks5", "socks5h", True),
])
def test_requests_go_through_the_proxy(upstream: MockUpstream, kind: str, scheme: str, auth: bool) -> None:
    proxy = ProxyServer(kind, *((USER, PASSWORD) if auth else ())).start()
    try:
        upstream.replies["m"] = Reply(body=chat_completion("via proxy"))
        # "localhost" shows who resolved the name: socks5 sends an IP, socks5h the name.
        upstream_url = f"http://localhost:{upstream.port}"
        cfg = proxied_config(upstream_url, proxy.url(scheme, QUOTED if auth else None))
        with run_gateway(cfg) as gw:
            client = sdk(gw)
            answer = client.chat.completions.create(model="r", messages=[{"role": "user", "content": "hi"}])
            assert answer.choices[0].message.content == "via proxy"
            upstream.replies["m"] = Reply(sse=stream_of("through", " the", " tunnel"))
            stream = client.chat.completions.create(model="r", stream=True,
                                                    messages=[{"role": "user", "content": "hi"}])
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "through the tunnel"
        assert [r.json["model"] for r in upstream.received] == ["m", "m"]
        assert upstream.received[0].headers["authorization"] == "Bearer sk-upstream-secret-1"
        assert proxy.tunnels, "the proxy saw no tunnel"
        t = proxy.tunnels[0]
        if kind == "http":
            assert t.target == f"localhost:{upstream.port}"
            expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
            assert t.auth == (expected if auth else None)
        else:
            assert t.auth == (f"{USER}:{PASSWORD}" if auth else None)
            if scheme == "socks5h":
                assert (t.atyp, t.target) == (3, f"localhost:{upstream.port}")
            else:
                assert t.atyp in (1, 4)
                assert ipaddress.ip_address(t.target.rsplit(":", 1)[0].strip("[]")).is_loopback
    finally:
        proxy.stop()


def test_connections_through_a_proxy_are_pooled(upstream: MockUpstream, http_proxy: ProxyServer) -> None:
    with run_gateway(proxied_config(upstream.url, http_proxy.url())) as gw:
        client = sdk(gw)
        for _ in range(3):
            client.chat.completions.create(model="r", messages=[{"role": "user", "content": "hi"}])
    assert len(upstream.received) == 3
    assert len(http_proxy.tunnels) == 1  # one tunnel, kept alive, reused


@pytest.mark.parametrize("kind", ["http", "socks5"])
def test_wrong_password_fails_the_step_cleanly(upstream: MockUpstream, kind: str) -> None:
    proxy = ProxyServer(kind, USER, PASSWORD).start()
    wrong = "alice:not-the-password-42"
    try:
        cfg = proxied_config(upstream.url, proxy.url(kind, wrong))
        with run_gateway(cfg) as gw:
            r = httpx.post(gw.url + "/v1/chat/completions", headers={"x-api-key": GATEWAY_KEY},
                           json={"model": "r", "messages": [{"role": "user", "content": "x"}]})
            assert r.status_code == 502
            err = r.json()["error"]
            assert err["code"] == "all_steps_failed"
            msg = err["attempts"][0]["error"]
            assert f"proxy {kind}://127.0.0.1:{proxy.port}" in msg
            assert ("407" in msg and "rejected" in msg) if kind == "http" else "rejected the username/password" in msg
            logs = gw.logs.getvalue()
        for text in (r.text, logs):
            assert "not-the-password-42" not in text
        assert upstream.received == []  # never reached the upstream
    finally:
        proxy.stop()


def test_proxy_failure_falls_through_to_the_next_step(upstream: MockUpstream,
                                                      socks_proxy_auth: ProxyServer) -> None:
    upstream.replies["direct"] = Reply(body=chat_completion("from step 2"))
    cfg = proxied_config(upstream.url, socks_proxy_auth.url("socks5", "alice:wrong-pass-0000"), fallback=True)
    with run_gateway(cfg) as gw:
        raw = sdk(gw).chat.completions.with_raw_response.create(
            model="r", messages=[{"role": "user", "content": "x"}])
        assert raw.headers["x-gateway-attempts"] == "2"
        assert raw.parse().choices[0].message.content == "from step 2"


@pytest.mark.parametrize("kind", ["http", "socks5"])
def test_missing_credentials_say_so(upstream: MockUpstream, kind: str) -> None:
    proxy = ProxyServer(kind, USER, PASSWORD).start()
    try:
        with run_gateway(proxied_config(upstream.url, proxy.url(kind))) as gw:
            r = httpx.post(gw.url + "/v1/chat/completions", headers={"x-api-key": GATEWAY_KEY},
                           json={"model": "r", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 502
        assert "user:password@" in r.json()["error"]["attempts"][0]["error"]
    finally:
        proxy.stop()


def test_unreachable_proxy_is_a_connect_error(upstream: MockUpstream) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with run_gateway(proxied_config(upstream.url, f"socks5h://{QUOTED}@127.0.0.1:{port}")) as gw:
        r = httpx.post(gw.url + "/v1/chat/completions", headers={"x-api-key": GATEWAY_KEY},
                       json={"model": "r", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 502
    msg = r.json()["error"]["attempts"][0]["error"]
    assert msg.startswith(f"cannot connect to proxy socks5h://127.0.0.1:{port}")
    assert "s3cret" not in r.text


def test_proxy_refusing_the_target_is_reported(upstream: MockUpstream, http_proxy: ProxyServer,
                                               socks_proxy: ProxyServer) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead = s.getsockname()[1]
    s.close()
    client = UpstreamClient(UpstreamConfig(connect_timeout=5))

    async def main() -> list[str]:
        out = []
        for proxy in (http_proxy.url(), socks_proxy.url()):
            try:
                await client.request(b"GET", f"http://127.0.0.1:{dead}/", [], proxy=proxy)
            except ConnectError as exc:
                out.append(str(exc))
        await client.aclose()
        return out

    http_msg, socks_msg = anyio.run(main)
    assert "refused the tunnel" in http_msg and "502" in http_msg
    assert "could not connect" in socks_msg and "connection refused" in socks_msg


# -- TLS: to the proxy (https://) and to the origin through the tunnel ------------
@dataclass
class PKI:
    ca_pem: bytes
    server_ctx: ssl.SSLContext

    def client_ctx(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cadata=self.ca_pem.decode())
        return ctx


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    """A throwaway CA and a certificate for localhost and 127.0.0.1."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "at-gateway test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    d: Path = tmp_path_factory.mktemp("pki")
    (d / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(d / "cert.pem", d / "key.pem")
    return PKI(ca.public_bytes(serialization.Encoding.PEM), server_ctx)


@pytest.fixture
def tls_upstream(pki: PKI) -> Iterator[MockUpstream]:
    mock = MockUpstream()
    mock.server.socket = pki.server_ctx.wrap_socket(mock.server.socket, server_side=True,
                                                    do_handshake_on_connect=False)
    mock.start()
    yield mock
    mock.stop()


def _post_json(client: UpstreamClient, url: str, proxy: str) -> tuple[int, dict[str, Any]]:
    async def main() -> tuple[int, dict[str, Any]]:
        try:
            body = json.dumps({"model": "m", "messages": []}).encode()
            status, _, data = await client.request(b"POST", url, [(b"content-type", b"application/json")],
                                                   body, proxy=proxy)
            return status, json.loads(data)
        finally:
            await client.aclose()

    return anyio.run(main)


@pytest.mark.parametrize(("kind", "scheme", "proxy_tls"), [
    ("http", "http", False), ("http", "https", True), ("socks5", "socks5", False), ("socks5", "socks5h", False),
])
def test_https_origin_through_the_tunnel(pki: PKI, tls_upstream: MockUpstream, kind: str, scheme: str,
                                         proxy_tls: bool) -> None:
    tls_upstream.replies["m"] = Reply(body=chat_completion("over tls"))
    proxy = ProxyServer(kind, USER, PASSWORD, tls=pki.server_ctx if proxy_tls else None).start()
    try:
        client = UpstreamClient(UpstreamConfig(connect_timeout=5), ssl_context=pki.client_ctx())
        status, obj = _post_json(client, f"https://localhost:{tls_upstream.port}/chat/completions",
                                 proxy.url(scheme, QUOTED).replace("127.0.0.1", "localhost"))
        assert status == 200 and obj["choices"][0]["message"]["content"] == "over tls"
        assert len(tls_upstream.received) == 1 and len(proxy.tunnels) == 1
    finally:
        proxy.stop()


def test_untrusted_origin_certificate_through_the_tunnel(pki: PKI, tls_upstream: MockUpstream,
                                                         http_proxy: ProxyServer) -> None:
    client = UpstreamClient(UpstreamConfig(connect_timeout=5), ssl_context=ssl.create_default_context())
    with pytest.raises(ConnectError) as exc:
        _post_json(client, f"https://localhost:{tls_upstream.port}/chat/completions", http_proxy.url())
    assert "TLS handshake with localhost" in str(exc.value) and "through the proxy" in str(exc.value)


def test_untrusted_https_proxy_certificate(pki: PKI, upstream: MockUpstream) -> None:
    proxy = ProxyServer("http", tls=pki.server_ctx).start()
    try:
        client = UpstreamClient(UpstreamConfig(connect_timeout=5), ssl_context=ssl.create_default_context())
        with pytest.raises(ConnectError) as exc:
            _post_json(client, upstream.url + "/chat/completions", proxy.url("https", QUOTED))
        msg = str(exc.value)
        assert msg.startswith(f"proxy https://127.0.0.1:{proxy.port}: TLS handshake with the proxy failed")
        assert "s3cret" not in msg
    finally:
        proxy.stop()


def test_bytes_after_the_connect_answer_are_kept() -> None:
    """A proxy may send tunnel bytes in the same packet as its 200: they must not be lost."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    seen: list[bytes] = []

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                head += conn.recv(4096)
            seen.append(head)
            conn.sendall(b"HTTP/1.1 200 OK\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nearly")
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                request += chunk
            seen.append(request)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    client = UpstreamClient(UpstreamConfig(connect_timeout=5))

    async def main() -> bytes:
        try:
            async with client.stream(b"GET", "http://origin.example:8080/x", [],
                                     proxy=f"http://127.0.0.1:{port}") as resp:
                return await resp.read()
        finally:
            await client.aclose()

    try:
        assert anyio.run(main) == b"early"
    finally:
        srv.close()
        t.join(5)
    assert seen[0].startswith(b"CONNECT origin.example:8080 HTTP/1.1\r\n")
    assert seen[1].startswith(b"GET /x HTTP/1.1\r\n")


# -- proxy URLs and config ---------------------------------------------------------
def test_parse_proxy_url() -> None:
    p = parse_proxy_url(f"socks5h://{QUOTED}@proxy.example")
    assert (p.scheme, p.host, p.port, p.username, p.password) == ("socks5h", "proxy.example", 1080, USER, PASSWORD)
    assert p.display == "socks5h://proxy.example:1080"
    assert PASSWORD not in repr(p)
    assert "s3cret" not in repr(ProxyConnector(f"http://{QUOTED}@h:1", ssl.create_default_context))
    assert parse_proxy_url("http://h").port == 80
    assert parse_proxy_url("https://h/").port == 443
    assert parse_proxy_url("http://[::1]:3128").display == "http://[::1]:3128"
    for bad in ("ftp://h:1", "http://:1", "http://h:99999", "http://h:1/path"):
        with pytest.raises(ValueError):
            parse_proxy_url(bad)
    with pytest.raises(ConnectError) as exc:
        ProxyConnector("socks4://u:hunter22@h:1", ssl.create_default_context)
    assert "hunter22" not in str(exc.value)


def test_config_checks_proxy_urls(upstream: MockUpstream) -> None:
    for bad in ("ftp://proxy:21", "socks5://proxy:notaport", "proxy.example:3128"):
        cfg = proxied_config(upstream.url, bad)
        with pytest.raises(ConfigError) as exc:
            build_config(cfg, "t")
        assert any(p.startswith("providers[0].proxy:") for p in exc.value.problems)
    cfg = build_config(proxied_config(upstream.url, f"socks5h://{QUOTED}@127.0.0.1:1080"), "t")
    assert cfg.providers["up1"].proxy == f"socks5h://{QUOTED}@127.0.0.1:1080"


def test_silent_proxy_times_out_naming_the_proxy() -> None:
    """A proxy that accepts the connection but never answers the handshake: connect_timeout applies."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)  # the kernel completes the TCP handshake; nobody ever answers
    port = srv.getsockname()[1]
    client = UpstreamClient(UpstreamConfig(connect_timeout=0.3))

    async def main() -> None:
        try:
            await client.request(b"GET", "http://origin.example/", [], proxy=f"socks5://{QUOTED}@127.0.0.1:{port}")
        finally:
            await client.aclose()

    try:
        with pytest.raises(ConnectError) as exc:
            anyio.run(main)
    finally:
        srv.close()
    assert str(exc.value) == (f"connect to origin.example:80 through proxy socks5://127.0.0.1:{port} "
                              "timed out after 0.3s")
