"""Our pooled HTTP/1.1 client for upstream APIs, on anyio (framing: :mod:`.framing`).

Modelled on httpcore: one pool per origin with explicit checkout and return,
keep-alive expiry, and one exception hierarchy. The rules that matter:

* A connection goes back to the pool only when the response was read to
  its end and allows keep-alive; anything else closes it.
* The reuse rule: a connection is reused only while *nothing* is buffered in
  it at any layer: our parser's buffer, every stream layer between us and the
  socket (TLS records not yet decrypted and decrypted bytes not yet read, for
  each TLS layer: an https proxy means TLS inside TLS; the bytes a proxy sent
  after its handshake; the event loop's own queue of bytes read from the
  socket) and the socket itself (readable: bytes, EOF or an error).
  :meth:`Connection.unread` is that one check; it runs when the response ends
  (a connection that received bytes nobody asked for is closed, never pooled;
  the socket's poll is left to checkout, as nothing reads an idle socket) and
  again at checkout (bytes that arrived while it sat idle). An HTTP/1.1
  server never sends anything unasked, so such bytes can only be garbage or an
  answer meant for another request; handing them to the next request would
  give one client another's answer. A layer the check cannot see into makes
  the connection single-use.
* A pooled connection that the server closed while it sat idle is detected
  at checkout (the same check), and a request that fails on a *reused*
  connection before any response byte arrives is retried once on a fresh one,
  so a stale socket never counts as a failed route step.
* Cancellation anywhere closes the connection and frees its pool slot.
"""

from __future__ import annotations

import select
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc

from ..config import UpstreamConfig
from .errors import ConnectError, ProtocolError, ReadError, UpstreamError
from .framing import HeaderValidator, HTTPError, ResponseParser, request_bytes
from .origin import Origin, Target, parse_url
from .proxy import ProxyConnector
from .tls import LayeredStream, TLSStream

Headers = list[tuple[bytes, bytes]]


# A connector opens a byte stream to an origin (directly, or through a proxy).
Connector = Callable[[Origin, float], Awaitable[anyio.abc.ByteStream]]


def _loop_queue(stream: anyio.abc.ByteStream) -> Any | None:
    """The object holding the bytes the event loop read from the socket for this stream and nobody received yet.

    anyio's asyncio backend (uvloop too) reads into ``_protocol.read_queue`` (a deque; a 64 KiB receive()
    leaves the rest of a larger read there). This is the one place that relies on anyio internals; when
    they are not there, None: the connection is then never reused, which costs speed, never correctness.
    """
    protocol = getattr(stream, "_protocol", None)
    if isinstance(getattr(protocol, "read_queue", None), deque) and isinstance(getattr(protocol, "is_at_eof", None),
                                                                              bool):
        return protocol
    return None


class Connection:
    """One keep-alive HTTP/1.1 connection to an origin."""

    __slots__ = ("stream", "parser", "idle_since", "requests", "_poll", "_layers", "_loop")

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self.stream = stream
        self.parser = ResponseParser()  # replaced for each request
        self.idle_since = 0.0
        self.requests = 0
        # The layers between us and the socket, found once: TLS (maybe twice), a proxy's leftover bytes.
        layers: list[LayeredStream] = []
        base = stream
        while isinstance(base, LayeredStream):
            layers.append(base)
            base = base.transport_stream
        self._layers = tuple(layers)
        self._loop = _loop_queue(base)
        # poll(), not select(): select() refuses descriptors >= 1024, common in a busy gateway.
        self._poll: select.poll | None = None
        try:
            sock = stream.extra(anyio.abc.SocketAttribute.raw_socket)
            poll = select.poll()
            poll.register(sock, select.POLLIN)
            self._poll = poll
        except Exception:  # not a socket stream: unread() says so, and the connection is never reused
            pass

    def unread(self, poll: bool = True) -> bool:
        """True when anything is buffered at any layer, or the socket is readable (EOF, an error, bytes
        nobody asked for). The pool's reuse rule: only a connection for which this is False is reused.

        ``poll=False`` skips the one system call, for the check when a response ends: nothing reads an
        idle socket, so what arrives there is still there for the check at checkout.
        """
        if self.parser.buf:
            return True
        for layer in self._layers:
            if layer.buffered():
                return True
        loop = self._loop
        if loop is None or loop.read_queue or loop.is_at_eof or self._poll is None:
            return True
        if not poll:
            return False
        try:
            return bool(self._poll.poll(0))
        except (OSError, ValueError):
            return True

    async def aclose(self) -> None:
        await anyio.aclose_forcefully(self.stream)


class Pool:
    """The connections of one origin (and proxy): idle ones, and a cap on all."""

    def __init__(self, limit: int, idle_timeout: float) -> None:
        self.idle: deque[Connection] = deque()
        self.active = 0
        self.limit = limit
        self.idle_timeout = idle_timeout
        self._slots = anyio.Semaphore(limit)

    def take_idle(self, dead: list[Connection]) -> Connection | None:
        """The most recently used live idle connection; expired or dropped ones go to ``dead``."""
        idle = self.idle  # oldest on the left: put_idle appends
        # Expired ones leave from the old end, so the expiry holds even while newer connections are reused.
        expired_before = time.monotonic() - self.idle_timeout
        while idle and idle[0].idle_since < expired_before:
            dead.append(idle.popleft())
        while idle:
            conn = idle.pop()  # most recently used first: likeliest alive
            if conn.unread():  # dropped while idle, or bytes nobody asked for arrived
                dead.append(conn)
                continue
            return conn
        return None

    def put_idle(self, conn: Connection) -> None:
        conn.idle_since = time.monotonic()
        self.idle.append(conn)


class Response:
    """An upstream response whose body is read on demand."""

    __slots__ = ("status", "headers", "_conn", "_done", "_client", "_pool")

    def __init__(self, status: int, headers: Headers, conn: Connection, client: UpstreamClient, pool: Pool) -> None:
        self.status = status
        self.headers = headers
        self._conn = conn
        self._done = False
        self._client = client
        self._pool = pool

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        """Yield body bytes as they arrive: everything one read brought comes out as one piece
        (many stream chunks that arrived together are relayed with one write, not one each)."""
        conn = self._conn
        p = conn.parser
        while not self._done:
            try:
                data = p.body()
            except HTTPError as exc:
                raise ProtocolError(f"invalid HTTP from upstream: {exc}") from None
            if p.done:
                self._done = True
            if data:
                yield data
            if self._done:
                return
            try:
                chunk = await conn.stream.receive(65536)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                chunk = b""
            except OSError as exc:
                raise ReadError(f"connection error while reading: {exc}") from None
            if not chunk:
                try:
                    p.eof()
                except HTTPError:
                    raise ProtocolError("upstream closed the connection before the response ended") from None
                self._done = True
                return
            p.feed(chunk)

    async def read(self) -> bytes:
        """The whole body, up to ``upstream.max_response_size`` (a larger one is a ProtocolError)."""
        limit = self._client.config.max_response_size
        parts: list[bytes] = []
        size = 0
        async for chunk in self.aiter_raw():
            size += len(chunk)
            if size > limit:
                raise ProtocolError(f"upstream answer larger than {limit} bytes (upstream.max_response_size)")
            parts.append(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    @property
    def complete(self) -> bool:
        return self._done


class UpstreamClient:
    """Pools of keep-alive connections, one per origin, for the whole process."""

    def __init__(self, config: UpstreamConfig | None = None, ssl_context: ssl.SSLContext | None = None) -> None:
        self.config = config or UpstreamConfig()
        self._ssl_context = ssl_context
        self._pools: dict[tuple[Origin, str | None], Pool] = {}
        self._targets: dict[str, Target] = {}
        self._connectors: dict[str | None, Connector] = {}
        self._header_validator = HeaderValidator()

    # -- plumbing -------------------------------------------------------
    @property
    def ssl_context(self) -> ssl.SSLContext:
        """One default context per process: building one costs milliseconds."""
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
            if self.config.ca_file:
                self._ssl_context.load_verify_locations(cafile=self.config.ca_file)
        return self._ssl_context

    def target(self, url: str) -> Target:
        t = self._targets.get(url)
        if t is None:
            t = parse_url(url)
            if len(self._targets) < 4096:
                self._targets[url] = t
        return t

    def pool(self, origin: Origin, proxy: str | None = None) -> Pool:
        key = (origin, proxy)
        p = self._pools.get(key)
        if p is None:
            p = self._pools[key] = Pool(self.config.max_connections_per_origin, self.config.idle_timeout)
        return p

    def stats(self) -> dict[str, int]:
        return {
            "active": sum(p.active for p in self._pools.values()),
            "idle": sum(len(p.idle) for p in self._pools.values()),
        }

    def connections(self) -> dict[str, tuple[int, int]]:
        """``{"scheme://host:port": (active, idle)}`` over every pool (proxied ones summed with direct ones):
        what the metrics show as atg_upstream_connections. Active counts requests holding a slot (sending, or
        opening their connection). A read of counters, nothing more: safe at any time."""
        out: dict[str, tuple[int, int]] = {}
        for (origin, _), p in self._pools.items():
            name = f"{origin.scheme}://{origin.host}:{origin.port}"
            active, idle = out.get(name, (0, 0))
            out[name] = (active + p.active, idle + len(p.idle))
        return out

    def register_connector(self, proxy: str | None, connector: Connector) -> None:
        """Proxies (HTTP CONNECT, SOCKS5) plug in here, keyed by their URL."""
        self._connectors[proxy] = connector

    def connector(self, proxy: str | None) -> Connector | None:
        """The connector for a proxy URL (built once per URL); None connects directly."""
        if proxy is None:
            return self._connectors.get(None)
        connector = self._connectors.get(proxy)
        if connector is None:
            connector = self._connectors[proxy] = ProxyConnector(proxy, lambda: self.ssl_context)
        return connector

    async def _open(self, origin: Origin, proxy: str | None) -> Connection:
        timeout = self.config.connect_timeout
        connector = self.connector(proxy)
        try:
            with anyio.fail_after(timeout):
                if connector is not None:
                    stream = await connector(origin, timeout)
                else:
                    stream = await anyio.connect_tcp(origin.host, origin.port)
                    if origin.scheme == "https":
                        try:
                            stream = await TLSStream.wrap(stream, origin.host, self.ssl_context)
                        except BaseException:
                            await anyio.aclose_forcefully(stream)
                            raise
        except TimeoutError:
            via = f" through proxy {getattr(connector, 'display', '(proxy)')}" if proxy else ""
            raise ConnectError(f"connect to {origin.host}:{origin.port}{via} timed out after {timeout:g}s") from None
        except ssl.SSLError as exc:
            raise ConnectError(f"TLS handshake with {origin.host}:{origin.port} failed: {exc.reason or exc}") from None
        except anyio.EndOfStream:  # only the TLS handshake reads while connecting
            raise ConnectError(f"TLS handshake with {origin.host}:{origin.port} failed: "
                               "the server closed the connection") from None
        except (OSError, anyio.BrokenResourceError) as exc:
            msg = getattr(exc, "strerror", None) or str(exc) or exc.__class__.__name__
            raise ConnectError(f"cannot connect to {origin.host}:{origin.port}: {msg}") from None
        return Connection(stream)

    # -- the request ----------------------------------------------------
    @asynccontextmanager
    async def stream(self, method: bytes, url: str, headers: Headers, body: bytes = b"",
                     proxy: str | None = None) -> AsyncIterator[Response]:
        """Send a request; yield the response with its body unread.

        Leaving the block returns the connection to the pool if the body was
        read to its end, and closes it otherwise (including on cancellation).
        """
        target = self.target(url)
        pool = self.pool(target.origin, proxy)
        try:
            pool._slots.acquire_nowait()  # a free slot needs no trip through the event loop
        except anyio.WouldBlock:
            await pool._slots.acquire()
        pool.active += 1
        conn: Connection | None = None
        reusable = False
        try:
            req_headers = [(b"host", target.origin.host_header), *headers]
            if body or method not in (b"GET", b"HEAD"):
                req_headers.append((b"content-length", str(len(body)).encode()))
            dead: list[Connection] = []
            conn = pool.take_idle(dead)
            for d in dead:
                await d.aclose()
            reused = conn is not None
            while True:
                if conn is None:
                    conn = await self._open(target.origin, proxy)
                try:
                    status, resp_headers = await self._send(conn, method, target.path, req_headers, body)
                    break
                except _StaleConnection as exc:
                    stale, conn = conn, None
                    await stale.aclose()
                    if not reused:
                        raise ProtocolError(str(exc)) from None
                    reused = False  # retried once, on a fresh connection (other idle ones may be stale too)
            conn.requests += 1
            response = Response(status, resp_headers, conn, self, pool)
            try:
                yield response
            except UpstreamError:
                raise  # the connection's own failure (framing, max_response_size): closed
            except Exception:
                # The caller's exception, e.g. the step failure an adapter raises for a whole error answer it
                # read: that connection is as good as after a success (a retry then reuses it, no new handshake).
                reusable = response._done and conn.parser.keep_alive and not conn.unread(poll=False)
                raise
            # The reuse rule (module docstring): read to its end, keep-alive, and nothing else received.
            reusable = response._done and conn.parser.keep_alive and not conn.unread(poll=False)
        finally:
            # Bookkeeping first, synchronously: in a cancelled scope every await raises.
            pool.active -= 1
            pool._slots.release()
            if conn is not None:
                if reusable:
                    pool.put_idle(conn)
                else:
                    with anyio.CancelScope(shield=True):
                        await conn.aclose()

    async def _send(self, conn: Connection, method: bytes, path: bytes, headers: Headers,
                    body: bytes) -> tuple[int, Headers]:
        try:
            data = request_bytes(method, path, headers, body, self._header_validator)
        except HTTPError as exc:
            raise UpstreamError(f"cannot send request: {exc}") from None
        p = conn.parser = ResponseParser(head_only=method == b"HEAD")
        try:
            await conn.stream.send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            raise _StaleConnection(f"connection lost while sending: {exc.__class__.__name__}") from None
        got_bytes = False
        while True:
            try:
                head = p.head()
            except HTTPError as exc:
                raise ProtocolError(f"invalid HTTP from upstream: {exc}") from None
            if head is not None:
                return head
            try:
                chunk = await conn.stream.receive(65536)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                chunk = b""
            if not chunk:
                if not got_bytes:
                    raise _StaleConnection("upstream closed the connection before answering")
                raise ProtocolError("upstream closed the connection before answering")
            got_bytes = True
            p.feed(chunk)

    async def request(self, method: bytes, url: str, headers: Headers, body: bytes = b"",
                      proxy: str | None = None) -> tuple[int, Headers, bytes]:
        async with self.stream(method, url, headers, body, proxy) as resp:
            data = await resp.read()
            return resp.status, resp.headers, data

    async def aclose(self) -> None:
        for pool in self._pools.values():
            while pool.idle:
                await pool.idle.pop().aclose()


class _StaleConnection(Exception):
    """The connection died before any response byte: safe to retry on a fresh one."""
