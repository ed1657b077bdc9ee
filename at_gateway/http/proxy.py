"""Upstream connections through a proxy: HTTP CONNECT and SOCKS5, no dependency.

A provider's ``proxy:`` URL picks the protocol:

* ``http://host:port``: an HTTP proxy, asked for a tunnel with ``CONNECT``
  (RFC 9110 section 9.3.6); ``user:password@`` becomes a
  ``Proxy-Authorization: Basic`` header.
* ``https://host:port``: the same, spoken over TLS to the proxy itself
  (verified with the client's shared SSL context).
* ``socks5://host:port``: SOCKS5 (RFC 1928), the origin's name resolved
  here; ``user:password@`` is sent as RFC 1929 username/password auth.
* ``socks5h://host:port``: SOCKS5 with the name sent to the proxy to
  resolve (needed when only the proxy can resolve it).

Default ports: 80 (http), 443 (https), 1080 (socks5, socks5h). Credentials
are percent-decoded, so a ``@`` or ``:`` in a password is written ``%40``/``%3A``.

Every origin gets a tunnel, also plain-``http://`` ones (no absolute-form
forwarding): one code path, and the proxy never sees request bodies. TLS to an
``https://`` origin runs end to end through the tunnel with the shared
context. Every failure is a :class:`ConnectError` whose message names the
proxy as ``scheme://host:port``, never its credentials.
"""

from __future__ import annotations

import base64
import ipaddress
import re
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import anyio
import anyio.abc

from .errors import ConnectError
from .origin import Origin
from .tls import LayeredStream, TLSStream

PROXY_SCHEMES = ("http", "https", "socks5", "socks5h")
_DEFAULT_PORTS = {"http": 80, "https": 443, "socks5": 1080, "socks5h": 1080}
_MAX_CONNECT_HEAD = 16 * 1024
_STATUS_LINE = re.compile(rb"^HTTP/1\.[01] (\d{3})(?: ([^\r\n]*))?\r?\n")

# RFC 1928 section 6, REP values.
_SOCKS_REPLIES = {
    1: "general SOCKS server failure",
    2: "connection not allowed by ruleset",
    3: "network unreachable",
    4: "host unreachable",
    5: "connection refused",
    6: "TTL expired",
    7: "command not supported",
    8: "address type not supported",
}


@dataclass(frozen=True)
class ProxyURL:
    scheme: str
    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def display(self) -> str:
        """The proxy as shown in messages: never its credentials."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def parse_proxy_url(url: str) -> ProxyURL:
    """Parse a ``proxy:`` URL; ValueError (without the password) when it is not one."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        raise ValueError("the proxy URL has an invalid port or host") from None
    scheme = parts.scheme.lower()
    if scheme not in PROXY_SCHEMES:
        raise ValueError(f"proxy scheme must be one of {', '.join(PROXY_SCHEMES)} (got {scheme or 'none'!r})")
    if not parts.hostname:
        raise ValueError("the proxy URL names no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("the proxy URL must be scheme://[user:password@]host[:port] with no path")
    username = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    return ProxyURL(scheme, parts.hostname, port or _DEFAULT_PORTS[scheme], username, password)


class _Failure(Exception):
    """A proxy step failed; the message is final (no secrets)."""


class _Reader:
    """Reads handshake replies exactly, keeping whatever came after them."""

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def _fill(self) -> None:
        self.buf += await self.stream.receive(65536)

    async def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            await self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def until(self, delimiter: bytes, limit: int) -> bytes:
        while True:
            i = self.buf.find(delimiter)
            if i >= 0:
                end = i + len(delimiter)
                out = bytes(self.buf[:end])
                del self.buf[:end]
                return out
            if len(self.buf) > limit:
                raise _Failure("answer to CONNECT is too long")
            await self._fill()


class _PrefixedStream(LayeredStream):
    """A stream that first returns bytes already read past a handshake (buffered until then)."""

    def __init__(self, inner: anyio.abc.ByteStream, prefix: bytes) -> None:
        self.transport_stream = inner
        self._prefix = prefix

    def buffered(self) -> bool:
        return bool(self._prefix)

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if self._prefix:
            data, self._prefix = self._prefix[:max_bytes], self._prefix[max_bytes:]
            return data
        return await self.transport_stream.receive(max_bytes)

    async def send(self, item: bytes) -> None:
        await self.transport_stream.send(item)

    async def send_eof(self) -> None:
        await self.transport_stream.send_eof()

    async def aclose(self) -> None:
        await self.transport_stream.aclose()

    @property
    def extra_attributes(self) -> Any:
        return self.transport_stream.extra_attributes


def _authority(origin: Origin) -> str:
    host = f"[{origin.host}]" if ":" in origin.host else origin.host
    return f"{host}:{origin.port}"


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc)
    return getattr(exc, "strerror", None) or str(exc) or exc.__class__.__name__


class ProxyConnector:
    """Opens byte streams to origins through one proxy (a ``Connector`` for UpstreamClient)."""

    def __init__(self, url: str, ssl_context: Callable[[], ssl.SSLContext]) -> None:
        try:
            self.proxy = parse_proxy_url(url)
        except ValueError as exc:
            raise ConnectError(f"invalid proxy URL: {exc}") from None
        self.display = self.proxy.display
        self._ssl_context = ssl_context

    def __repr__(self) -> str:
        return f"ProxyConnector({self.display})"

    async def __call__(self, origin: Origin, timeout: float) -> anyio.abc.ByteStream:
        """A stream to ``origin`` through the proxy (TLS to the origin included for https)."""
        p = self.proxy
        try:
            raw = await anyio.connect_tcp(p.host, p.port)
        except OSError as exc:
            raise ConnectError(f"cannot connect to proxy {self.display}: {_reason(exc)}") from None
        stream: anyio.abc.ByteStream = raw
        phase = "the TLS handshake with the proxy"
        try:
            if p.scheme == "https":
                try:
                    stream = await TLSStream.wrap(stream, p.host, self._ssl_context())
                except ssl.SSLError as exc:
                    raise _Failure(f"TLS handshake with the proxy failed: {_reason(exc)}") from None
            phase = "the SOCKS5 handshake" if p.scheme.startswith("socks") else "CONNECT"
            reader = _Reader(stream)
            if p.scheme.startswith("socks"):
                await self._socks5(stream, reader, origin)
            else:
                await self._http_connect(stream, reader, origin)
            if reader.buf:
                stream = _PrefixedStream(stream, bytes(reader.buf))
            if origin.scheme == "https":
                phase = f"the TLS handshake with {_authority(origin)} through the proxy"
                try:
                    stream = await TLSStream.wrap(stream, origin.host, self._ssl_context())
                except ssl.SSLError as exc:
                    raise _Failure(f"TLS handshake with {_authority(origin)} through the proxy failed: "
                                   f"{_reason(exc)}") from None
        except _Failure as exc:
            await anyio.aclose_forcefully(stream)
            raise ConnectError(f"proxy {self.display}: {exc}") from None
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            await anyio.aclose_forcefully(stream)
            detail = "closed the connection" if isinstance(exc, (anyio.EndOfStream, anyio.BrokenResourceError)) \
                else f"connection failed ({_reason(exc)})"
            raise ConnectError(f"proxy {self.display} {detail} during {phase}") from None
        except BaseException:  # cancellation, timeouts: just don't leak the socket
            await anyio.aclose_forcefully(stream)
            raise
        return stream

    # -- HTTP CONNECT ---------------------------------------------------------
    async def _http_connect(self, stream: anyio.abc.ByteStream, reader: _Reader, origin: Origin) -> None:
        p = self.proxy
        authority = _authority(origin)
        lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
        if p.username is not None:
            token = base64.b64encode(f"{p.username}:{p.password or ''}".encode()).decode("ascii")
            lines.append(f"Proxy-Authorization: Basic {token}")
        await stream.send(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = await reader.until(b"\r\n\r\n", _MAX_CONNECT_HEAD)
        m = _STATUS_LINE.match(head)
        if not m:
            raise _Failure("the answer to CONNECT is not HTTP/1.x")
        status = int(m.group(1))
        if 200 <= status < 300:
            return
        # Whole (the head is bounded): routing redacts the message, then cuts it; a cut here could split a secret.
        reason = re.sub(r"[^ -~]", "?", (m.group(2) or b"").decode("latin-1"))
        if status == 407:
            hint = ("the configured username/password was rejected" if p.username is not None
                    else "it requires authentication: put user:password@ in the proxy URL")
            raise _Failure(f"HTTP 407 {reason or 'Proxy Authentication Required'}: {hint}")
        raise _Failure(f"refused the tunnel to {authority}: HTTP {status} {reason}".rstrip())

    # -- SOCKS5 ---------------------------------------------------------------
    async def _socks5(self, stream: anyio.abc.ByteStream, reader: _Reader, origin: Origin) -> None:
        p = self.proxy
        methods = b"\x00\x02" if p.username is not None else b"\x00"
        await stream.send(b"\x05" + bytes([len(methods)]) + methods)
        version, method = await reader.exactly(2)
        if version != 5:
            raise _Failure("not a SOCKS5 proxy (bad greeting reply)")
        if method == 0x02:
            if p.username is None:
                raise _Failure("requires a username and password: put user:password@ in the proxy URL")
            user, password = p.username.encode(), (p.password or "").encode()
            if not 1 <= len(user) <= 255 or len(password) > 255:
                raise _Failure("SOCKS5 username and password must be 1 to 255 bytes")
            await stream.send(b"\x01" + bytes([len(user)]) + user + bytes([len(password)]) + password)
            _, status = await reader.exactly(2)
            if status != 0:
                raise _Failure("rejected the username/password (RFC 1929 authentication failed)")
        elif method == 0xFF:
            hint = "" if p.username is not None else " (it may need user:password@ in the proxy URL)"
            raise _Failure(f"accepts none of our authentication methods{hint}")
        elif method != 0x00:
            raise _Failure(f"chose an authentication method we did not offer ({method:#04x})")

        address = await self._socks_address(origin)
        await stream.send(b"\x05\x01\x00" + address + origin.port.to_bytes(2, "big"))
        version, reply, _, atyp = await reader.exactly(4)
        if version != 5:
            raise _Failure("not a SOCKS5 proxy (bad connect reply)")
        if reply != 0:
            why = _SOCKS_REPLIES.get(reply, f"error {reply}")
            raise _Failure(f"could not connect to {_authority(origin)}: {why}")
        if atyp == 1:
            await reader.exactly(4 + 2)
        elif atyp == 4:
            await reader.exactly(16 + 2)
        elif atyp == 3:
            (length,) = await reader.exactly(1)
            await reader.exactly(length + 2)
        else:
            raise _Failure(f"sent an unknown address type {atyp} in its connect reply")

    async def _socks_address(self, origin: Origin) -> bytes:
        """ATYP and DST.ADDR: an IP resolved here (socks5), or the name for the proxy (socks5h)."""
        ip = _ip(origin.host)
        if ip is None and self.proxy.scheme == "socks5h":
            try:
                name = origin.host.encode("idna")
            except UnicodeError:
                raise _Failure(f"cannot encode the host name {origin.host!r}") from None
            if len(name) > 255:
                raise _Failure("the host name is longer than SOCKS5 allows (255 bytes)")
            return b"\x03" + bytes([len(name)]) + name
        if ip is None:
            try:
                infos = await anyio.getaddrinfo(origin.host, origin.port, type=socket.SOCK_STREAM)
            except OSError as exc:
                raise _Failure(f"cannot resolve {origin.host} locally ({_reason(exc)}); "
                               "with socks5h:// the proxy resolves names instead") from None
            ip = _ip(str(infos[0][4][0])) if infos else None
            if ip is None:
                raise _Failure(f"cannot resolve {origin.host} locally")
        return (b"\x01" if ip.version == 4 else b"\x04") + ip.packed
