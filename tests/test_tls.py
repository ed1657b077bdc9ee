"""Serving HTTPS with `tls: {cert_file, key_file}`."""

from __future__ import annotations

import datetime
import json
import os
import socket
import ssl
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.conftest import GATEWAY_KEY, base_config, run_gateway
from tests.mock_upstream import MockUpstream, Reply, stream_of


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def test_https_serving(upstream: MockUpstream, tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    cfg = base_config(upstream.url, tls={"cert_file": str(cert), "key_file": str(key)})
    with run_gateway(cfg) as gw:
        ctx = ssl.create_default_context(cafile=str(cert))
        url = f"https://localhost:{gw.port}"
        with httpx.Client(verify=ctx) as client:
            assert client.get(url + "/health").json() == {"status": "healthy"}
            r = client.post(url + "/v1/chat/completions", headers={"x-api-key": GATEWAY_KEY},
                            json={"model": "demo", "stream": True, "messages": [{"role": "user", "content": "a b"}]})
            assert r.status_code == 200 and r.content.endswith(b"data: [DONE]\n\n")
        # plain HTTP on the TLS port gets nothing it could mistake for an answer
        try:
            r = httpx.get(f"http://127.0.0.1:{gw.port}/health", timeout=3)
            assert r.status_code != 200
        except httpx.HTTPError:
            pass


def test_https_upstream_with_private_ca(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    up = MockUpstream(tls=(str(cert), str(key))).start()
    try:
        route = [{"name": "r", "steps": [{"provider": "up1", "model": "m"}]}]
        with run_gateway(base_config(up.url, route, upstream={"ca_file": str(cert)})) as gw:
            for _ in range(3):
                r = httpx.post(gw.url + "/v1/chat/completions", headers={"x-api-key": GATEWAY_KEY},
                               json={"model": "r", "messages": [{"role": "user", "content": "x"}]})
                assert r.status_code == 200
            assert up.connections == 1  # TLS connection kept alive and reused
        # without the CA, the certificate is refused: a failed step, not a crash
        with run_gateway(base_config(up.url, route)) as gw:
            r = httpx.post(gw.url + "/v1/chat/completions", headers={"x-api-key": GATEWAY_KEY},
                           json={"model": "r", "messages": [{"role": "user", "content": "x"}]})
            assert r.status_code == 502
            assert "TLS" in r.json()["error"]["attempts"][0]["error"]
    finally:
        up.stop()


def test_https_upstream_whose_certificate_names_another_host_is_refused(tmp_path: Path) -> None:
    """Our own TLS stream checks the host name: a certificate for localhost, trusted, but reached as
    127.0.0.1, is a failed step naming the verification failure."""
    cert, key = self_signed(tmp_path)
    up = MockUpstream(tls=(str(cert), str(key))).start()
    try:
        url = up.url.replace("//localhost:", "//127.0.0.1:")
        route = [{"name": "r", "steps": [{"provider": "up1", "model": "m"}]}]
        with run_gateway(base_config(url, route, upstream={"ca_file": str(cert)})) as gw:
            r = httpx.post(gw.url + "/v1/chat/completions", headers={"x-api-key": GATEWAY_KEY},
                           json={"model": "r", "messages": [{"role": "user", "content": "x"}]})
            assert r.status_code == 502
            error = r.json()["error"]["attempts"][0]["error"]
            assert "TLS" in error and ("CERTIFICATE_VERIFY_FAILED" in error or "match" in error), error
    finally:
        up.stop()


def test_corrupt_tls_record_mid_request_ends_only_that_connection(upstream: MockUpstream, tmp_path: Path) -> None:
    """A client whose TLS breaks while its request runs (the server reads on to notice a disconnect) loses
    its own connection; the server goes on serving everyone else (it used to stop listening altogether)."""
    cert, key = self_signed(tmp_path)
    upstream.replies["slow"] = Reply(sse=stream_of(*["w"] * 100), sse_delay=0.05)
    route = [{"name": "r", "steps": [{"provider": "up1", "model": "slow"}]}]
    with run_gateway(base_config(upstream.url, route, tls={"cert_file": str(cert), "key_file": str(key)})) as gw:
        ctx = ssl.create_default_context(cafile=str(cert))
        body = json.dumps({"model": "r", "stream": True, "messages": [{"role": "user", "content": "x"}]}).encode()
        with ctx.wrap_socket(socket.create_connection(("127.0.0.1", gw.port), timeout=5),
                             server_hostname="localhost") as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Api-Key: " + GATEWAY_KEY.encode() +
                      b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            data = b""
            while b"data:" not in data:
                data += s.recv(4096)
            with socket.socket(fileno=os.dup(s.fileno())) as raw:  # beneath TLS: a record that fails its MAC
                raw.sendall(b"\x17\x03\x03\x00\x20" + b"\x00" * 32)
            try:
                while s.recv(65536):  # the server closes this connection long before the stream's end
                    pass
            except (ssl.SSLError, ConnectionError):
                pass
        with httpx.Client(verify=ctx) as client:
            assert client.get(f"https://localhost:{gw.port}/health").json() == {"status": "healthy"}
        assert "Traceback" not in gw.logs.getvalue()
