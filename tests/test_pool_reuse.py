"""A pooled connection is never reused while it holds bytes nobody asked for, at any layer.

The mock upstream here is a raw server (TLS done by hand with ``ssl.SSLObject`` over memory BIOs,
so the test decides where TLS records begin and end) that answers a connection's first request and,
in the same write, sends a second complete answer nobody asked for: "the answer meant for another".
The next request must never get it: it goes on a fresh connection. Over plain TCP and TLS, directly
and through HTTP CONNECT proxies (plain and TLS, so TLS inside TLS), with the stray answer in the
same write or arriving later while the connection sits idle.
"""

from __future__ import annotations

import fcntl
import socket
import ssl
import struct
import sys
import termios
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
import anyio.abc
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from at_gateway.config import UpstreamConfig
from at_gateway.http.errors import ConnectError
from at_gateway.http.origin import Origin
from at_gateway.http.pool import UpstreamClient
from tests.test_proxy import ProxyServer
from tests.test_tls import self_signed

STRAY = b"meant for another"

# Where the records of (answer + stray answer) are cut: by default the stray answer in records of its own.
Layout = Callable[[bytes, bytes], list[bytes]]


def own_records(answer: bytes, stray: bytes) -> list[bytes]:
    return [answer, stray]


def response(body: bytes, size: int | None = None) -> bytes:
    """An HTTP/1.1 answer; with ``size``, the body is padded so that the whole answer is ``size`` bytes."""
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n"
    if size is not None:
        n = size - len(head % 0)
        while len(head % n) + n > size:
            n -= 1
        body += b"." * (n - len(body))
    return head % len(body) + body


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Certs:
    server: ssl.SSLContext
    client: ssl.SSLContext


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    cert, key = self_signed(tmp_path_factory.mktemp("reuse-pki"))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    return Certs(server, ssl.create_default_context(cafile=str(cert)))


class _Plain:
    def __init__(self, sock: anyio.abc.SocketStream, count: Callable[[int], None]) -> None:
        self.sock, self.count = sock, count

    async def handshake(self) -> None:
        pass

    async def receive(self) -> bytes:
        return await self.sock.receive()

    async def send(self, pieces: list[bytes]) -> None:
        data = b"".join(pieces)
        await self.sock.send(data)
        self.count(len(data))


class _TLS:
    """Server-side TLS by hand: each piece passed to send() is written as its own TLS record(s),
    and all of them leave in one write on the socket."""

    def __init__(self, sock: anyio.abc.SocketStream, ctx: ssl.SSLContext, count: Callable[[int], None]) -> None:
        self.sock, self.count = sock, count
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_side=True)

    async def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            await self.sock.send(data)
            self.count(len(data))

    async def handshake(self) -> None:
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                self.incoming.write(await self.sock.receive())
        await self._flush()

    async def receive(self) -> bytes:
        while True:
            try:
                data = self.obj.read(65536)
            except ssl.SSLWantReadError:
                await self._flush()
                self.incoming.write(await self.sock.receive())
                continue
            if not data:
                raise anyio.EndOfStream
            return data

    async def send(self, pieces: list[bytes]) -> None:
        for piece in pieces:
            self.obj.write(piece)
        await self._flush()


class StrayServer:
    """Answers request n on connection c with ``answer c-n``; the first answer on connection 1 comes with
    a second full answer nobody asked for, in the same write (or, with ``idle``, once ``release`` is set)."""

    def __init__(self, tls: ssl.SSLContext | None, idle: bool = False, layout: Layout = own_records,
                 answer_size: int | None = None) -> None:
        self.tls = tls
        self.idle = idle
        self.layout = layout
        self.answer_size = answer_size
        self.connections = 0
        self.sockets: list[socket.socket] = []
        self.sent = 0  # bytes written on sockets, TLS records included
        self.release = anyio.Event()
        self.stray_sent = anyio.Event()

    def _count(self, n: int) -> None:
        self.sent += n

    async def handle(self, sock: anyio.abc.SocketStream) -> None:
        self.connections += 1
        self.sockets.append(sock.extra(anyio.abc.SocketAttribute.raw_socket))
        conn = self.connections
        io = _TLS(sock, self.tls, self._count) if self.tls else _Plain(sock, self._count)
        async with sock:
            try:
                await io.handshake()
                served = 0
                while True:
                    data = b""
                    while b"\r\n\r\n" not in data:
                        data += await io.receive()
                    served += 1
                    first = conn == 1 and served == 1
                    answer = response(b"answer %d-%d" % (conn, served), self.answer_size if first else None)
                    if first:
                        stray = response(STRAY)
                        if self.idle:
                            await io.send([answer])
                            await self.release.wait()
                            await io.send([stray])
                        else:
                            await io.send(self.layout(answer, stray))
                        self.stray_sent.set()
                    else:
                        await io.send([answer])
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, ssl.SSLError, OSError):
                pass


class _Clean(StrayServer):
    """Every answer is the one asked for, on as many requests as a connection carries."""

    async def handle(self, sock: anyio.abc.SocketStream) -> None:
        self.connections += 1
        io = _TLS(sock, self.tls, self._count) if self.tls else _Plain(sock, self._count)
        async with sock:
            try:
                await io.handshake()
                for n in range(1, 100):
                    data = b""
                    while b"\r\n\r\n" not in data:
                        data += await io.receive()
                    await io.send([response(b"answer %d" % n)])
            except (anyio.EndOfStream, anyio.BrokenResourceError, ssl.SSLError, OSError):
                pass


@asynccontextmanager
async def serving(server: StrayServer) -> AsyncIterator[int]:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, server.handle)
        yield listener.extra(anyio.abc.SocketAttribute.local_port)
        tg.cancel_scope.cancel()


def unacked(sock: socket.socket) -> int:
    """Bytes sent on a socket that the peer's kernel has not acknowledged yet (Linux SIOCOUTQ): 0 means
    everything sent is in the receiver's socket buffer (elsewhere the loopback is trusted to be quick)."""
    if sys.platform != "linux" or sock.fileno() < 0:
        return 0
    try:
        return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0])
    except OSError:
        return 0


async def until(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait for a condition owned by the kernel or another thread (the proxy's relay)."""
    with anyio.fail_after(timeout):
        while not pred():
            await anyio.sleep(0.002)


@pytest.fixture
def proxies(certs: Certs) -> Iterator[dict[str, ProxyServer]]:
    started = {"http": ProxyServer("http").start(), "https": ProxyServer("http", tls=certs.server).start()}
    yield started
    for p in started.values():
        p.stop()


async def run_scenario(server: StrayServer, client: UpstreamClient, scheme: str,
                       proxy: ProxyServer | None = None, proxy_scheme: str = "http") -> list[bytes]:
    """Three requests, one at a time; returns their bodies. The stray answer is all delivered before the second."""
    proxy_url = proxy.url(proxy_scheme).replace("127.0.0.1", "localhost") if proxy is not None else None
    bodies: list[bytes] = []
    async with serving(server) as port:
        url = f"{scheme}://localhost:{port}/x"
        try:
            bodies.append((await client.request(b"GET", url, [], proxy=proxy_url))[2])
            server.release.set()
            await server.stray_sent.wait()
            # Delivered all the way to the client's socket (not in flight: no client could tell those bytes
            # from an answer to its next request).
            if proxy is not None:
                await until(lambda: proxy.relayed_down >= server.sent)
            await until(lambda: not any(map(unacked, server.sockets + (proxy.sockets() if proxy else []))))
            for _ in range(2):
                bodies.append((await client.request(b"GET", url, [], proxy=proxy_url))[2])
        finally:
            await client.aclose()
    return bodies


# -- the stray answer never reaches the next request ----------------------------------------------------
@pytest.mark.anyio
@pytest.mark.parametrize("idle", [False, True], ids=["same write", "while idle"])
@pytest.mark.parametrize("via", ["direct", "http proxy", "https proxy"])
@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_an_answer_nobody_asked_for_never_reaches_the_next_request(
        certs: Certs, proxies: dict[str, ProxyServer], scheme: str, via: str, idle: bool) -> None:
    server = StrayServer(certs.server if scheme == "https" else None, idle=idle)
    client = UpstreamClient(UpstreamConfig(connect_timeout=5), ssl_context=certs.client)
    proxy = None if via == "direct" else proxies[via.split()[0]]
    bodies = await run_scenario(server, client, scheme, proxy, via.split()[0])
    assert bodies[0].startswith(b"answer 1-1")
    assert bodies[1:] == [b"answer 2-1", b"answer 2-2"]  # a fresh connection, then that one reused
    assert server.connections == 2
    if proxy is not None:
        assert len(proxy.tunnels) == 2


@pytest.mark.anyio
async def test_a_stray_answer_left_in_the_socket_layer_after_a_64k_read(certs: Certs) -> None:
    """The first answer is exactly one 64 KiB read, so the stray answer that came with it stays in the
    socket stream's own queue (the event loop read it; nobody has received it): not our parser's, not the
    kernel's. That connection is not reused either."""
    server = StrayServer(None, answer_size=65536)
    bodies = await run_scenario(server, UpstreamClient(), "http")
    assert bodies[0].startswith(b"answer 1-1") and len(response(bodies[0])) == 65536
    assert bodies[1:] == [b"answer 2-1", b"answer 2-2"]
    assert server.connections == 2


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_keep_alive_still_reuses_clean_connections(certs: Certs, scheme: str) -> None:
    """The check costs no reuse: a connection that received nothing extra serves request after request."""

    async def main() -> None:
        server = _Clean(certs.server if scheme == "https" else None)
        client = UpstreamClient(ssl_context=certs.client)
        async with serving(server) as port:
            for n in range(1, 6):
                assert (await client.request(b"GET", f"{scheme}://localhost:{port}/", []))[2] == b"answer %d" % n
            assert client.stats() == {"active": 0, "idle": 1}
            await client.aclose()
        assert server.connections == 1

    anyio.run(main)


def test_a_layer_the_check_cannot_see_into_makes_connections_single_use(certs: Certs) -> None:
    """A connector may hand back any stream; one whose buffers the pool cannot inspect (here anyio's own
    TLSStream) is never reused: slower, never wrong."""
    from anyio.streams.tls import TLSStream as AnyioTLS

    async def opaque(origin: Origin, timeout: float) -> anyio.abc.ByteStream:
        raw = await anyio.connect_tcp(origin.host, origin.port)
        return await AnyioTLS.wrap(raw, hostname=origin.host, ssl_context=certs.client, standard_compatible=False)

    async def main() -> None:
        server = _Clean(certs.server)
        client = UpstreamClient(ssl_context=certs.client)
        client.register_connector(None, opaque)
        async with serving(server) as port:
            for _ in range(3):
                assert (await client.request(b"GET", f"https://localhost:{port}/", []))[2] == b"answer 1"
            assert client.stats() == {"active": 0, "idle": 0}
            await client.aclose()
        assert server.connections == 3

    anyio.run(main)


@pytest.mark.parametrize("close_notify", [True, False])
def test_tls_body_that_ends_with_the_connection(certs: Certs, close_notify: bool) -> None:
    """A body framed by the connection's end arrives whole, whether TLS closes with close_notify or the
    TCP connection just ends; the connection is not pooled."""

    async def handle(sock: anyio.abc.SocketStream) -> None:
        io = _TLS(sock, certs.server, lambda n: None)
        async with sock:
            await io.handshake()
            data = b""
            while b"\r\n\r\n" not in data:
                data += await io.receive()
            await io.send([b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\n", b"until ", b"the end"])
            if close_notify:
                try:
                    io.obj.unwrap()
                except ssl.SSLWantReadError:  # sent ours; not waiting for the client's
                    pass
                await io._flush()

    async def main() -> bytes:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, handle)
            client = UpstreamClient(ssl_context=certs.client)
            port = listener.extra(anyio.abc.SocketAttribute.local_port)
            body = (await client.request(b"GET", f"https://localhost:{port}/", []))[2]
            assert client.stats() == {"active": 0, "idle": 0}
            tg.cancel_scope.cancel()
        return body

    assert anyio.run(main) == b"until the end"


def test_tls_server_closing_during_the_handshake_is_a_connect_error(certs: Certs) -> None:
    async def main() -> str:
        async def hang_up(sock: anyio.abc.SocketStream) -> None:
            await sock.receive()  # the ClientHello
            await sock.aclose()

        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, hang_up)
            client = UpstreamClient(UpstreamConfig(connect_timeout=5), ssl_context=certs.client)
            try:
                port = listener.extra(anyio.abc.SocketAttribute.local_port)
                with pytest.raises(ConnectError) as exc:
                    await client.request(b"GET", f"https://localhost:{port}/", [])
            finally:
                tg.cancel_scope.cancel()
            assert client.stats() == {"active": 0, "idle": 0}
            return str(exc.value)

    msg = anyio.run(main)
    assert "TLS handshake with localhost" in msg


# -- the same, whatever the record layout ---------------------------------------------------------------
def _cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False) if b > a]


@settings(max_examples=30, deadline=None, derandomize=True)
@given(tls=st.booleans(), size=st.one_of(st.none(), st.integers(60, 70000), st.sampled_from([16384, 32768, 65536])),
       cuts=st.lists(st.integers(0, 1 << 20), max_size=6), straddle=st.booleans())
@example(tls=True, size=None, cuts=[], straddle=False)
@example(tls=False, size=65536, cuts=[], straddle=False)
@example(tls=True, size=16384, cuts=[16384], straddle=True)
def test_no_record_layout_lets_a_stray_answer_through(certs: Certs, tls: bool, size: int | None, cuts: list[int],
                                                      straddle: bool) -> None:
    """TLS records cut anywhere (straddling the end of the first answer, or not), answers of any size around
    the 16 KiB record and 64 KiB read limits: the stray answer is never handed to the next request."""

    def layout(answer: bytes, stray: bytes) -> list[bytes]:
        if straddle:  # records cut anywhere in the whole
            return _cut(answer + stray, cuts)
        return _cut(answer, cuts) + _cut(stray, cuts)

    server = StrayServer(certs.server if tls else None, layout=layout, answer_size=size)
    client = UpstreamClient(UpstreamConfig(connect_timeout=5), ssl_context=certs.client)
    bodies = anyio.run(run_scenario, server, client, "https" if tls else "http")
    assert bodies[1:] == [b"answer 2-1", b"answer 2-2"]
    assert server.connections == 2
