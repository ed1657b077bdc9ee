"""The server's limits, spoken to over raw sockets: the whole-body deadline, the connection cap with idle
keep-alive connections, requests with both Content-Length and Transfer-Encoding, and the head-size limit
counted in raw bytes. Each on both server paths: the fast path, and h11 (which takes a connection over at
its first request of another shape, e.g. a chunked one)."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import anyio.from_thread
import h11
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from at_gateway.http.server import Request, Responder, Server, ServerSettings
from tests.conftest import RunningGateway, base_config, run_gateway
from tests.mock_upstream import wait_until
from tests.test_server import chat_request, closed_by_peer, read_response

GET = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
# A chunked request: the fast path hands the connection to h11 for good.
CHUNKED = b"POST /chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
MAX_HEAD = 1024


class RunningServer:
    """A bare :class:`Server` whose handler echoes the request body as ``<length>:<body>``; a request to
    ``/block`` waits until :meth:`release` (to hold a connection busy)."""

    def __init__(self, portal: Any, server: Server, port: int, gate: anyio.Event) -> None:
        self.portal = portal
        self.server = server
        self.port = port
        self._gate = gate

    def connect(self, timeout: float = 5.0) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=timeout)

    def release(self) -> None:
        self.portal.call(self._gate.set)

    def idle(self) -> int:
        return self.portal.call(lambda: self.server.idle_connections)


@contextmanager
def serve(**overrides: Any) -> Iterator[RunningServer]:
    async def make_gate() -> anyio.Event:
        return anyio.Event()

    with anyio.from_thread.start_blocking_portal() as portal:
        gate = portal.call(make_gate)

        async def handler(request: Request, responder: Responder) -> None:
            if request.path == b"/block":
                await gate.wait()
            await responder.send(200, [(b"content-type", b"text/plain")], b"%d:%s" % (len(request.body), request.body))

        options: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "max_header_size": MAX_HEAD, "max_body_size": 4096,
                                   "header_timeout": 5.0, "body_timeout": 5.0, "keepalive_timeout": 30.0,
                                   "shutdown_timeout": 1.0}
        options.update(overrides)
        server = Server(handler, ServerSettings(**options))
        future, port = portal.start_task(server.serve)
        running = RunningServer(portal, server, port, gate)
        try:
            yield running
        finally:
            running.release()
            portal.call(server.shutdown)
            future.result(timeout=10)


def exchange(s: socket.socket, data: bytes) -> tuple[int, dict[str, str], bytes]:
    s.sendall(data)
    return read_response(s, bytearray())


# -- 5. one deadline for the whole body ---------------------------------------------------------------

@pytest.fixture
def slow_body_gw() -> Iterator[RunningGateway]:
    # header_timeout (1 s) is far longer than the 50 ms between the bytes: only body_timeout can end it.
    with run_gateway(base_config("http://127.0.0.1:9", body_timeout="0.4s", header_timeout="1s",
                                 keepalive_timeout="5s")) as g:
        yield g


def trickle(s: socket.socket, body: bytes, give_up: float) -> tuple[bytes, float]:
    """Send ``body`` a byte at a time, after each waiting up to 50 ms for an answer: the answer's first bytes and
    the seconds since the start (b"" when none came within ``give_up`` seconds)."""
    start = time.monotonic()
    s.settimeout(0.05)
    for i in range(len(body)):
        s.sendall(body[i:i + 1])
        try:
            data = s.recv(65536)
        except TimeoutError:
            if time.monotonic() - start > give_up:
                break
            continue
        return data, time.monotonic() - start
    return b"", time.monotonic() - start


@pytest.mark.parametrize("path", ["fast", "h11"])
def test_a_trickled_body_gets_408_at_body_timeout(slow_body_gw: RunningGateway, path: str) -> None:
    if path == "fast":
        head, body = chat_request(body=b"x" * 1000).split(b"\r\n\r\n", 1)
        head += b"\r\n\r\n"
    else:
        head = (chat_request(b"Transfer-Encoding: chunked\r\n", body=b"")
                .replace(b"Content-Length: 0\r\n", b""))
        body = b"1\r\nx\r\n" * 1000
    with socket.create_connection(("127.0.0.1", slow_body_gw.port), timeout=5) as s:
        s.sendall(head)
        first, elapsed = trickle(s, body, give_up=1.5)
        assert first, "no answer while the body trickled in for 1.5 s"
        s.settimeout(5)
        status, headers, answer = read_response(s, bytearray(first))
        assert status == 408 and b"request_timeout" in answer and headers["connection"] == "close"
        assert 0.3 <= elapsed <= 1.0, elapsed  # at body_timeout (0.4 s), not per read
        assert closed_by_peer(s)


def test_a_body_that_arrives_within_body_timeout_is_served(slow_body_gw: RunningGateway) -> None:
    req = chat_request()
    with socket.create_connection(("127.0.0.1", slow_body_gw.port), timeout=5) as s:
        head_end = req.index(b"\r\n\r\n") + 4
        s.sendall(req[:head_end + 5])
        s.sendall(req[head_end + 5:])
        assert read_response(s, bytearray())[0] == 200


# -- 6. a full server closes idle keep-alive connections for a newcomer -------------------------------

@pytest.mark.parametrize("path", ["fast", "h11"])
def test_a_full_server_closes_the_longest_idle_connection_for_a_newcomer(path: str) -> None:
    first = GET if path == "fast" else CHUNKED
    with serve(max_connections=2) as srv, srv.connect() as a, srv.connect() as b:
        assert exchange(a, first)[0] == 200
        assert wait_until(lambda: srv.idle() == 1)  # a is idle before b
        assert exchange(b, first)[0] == 200
        assert wait_until(lambda: srv.idle() == 2)
        with srv.connect(timeout=1.0) as c:
            assert exchange(c, GET)[0] == 200  # at once, not after keepalive_timeout (30 s)
        assert closed_by_peer(a)  # the longest idle one made room
        assert exchange(b, GET)[0] == 200  # the other one still works


def test_a_full_server_of_busy_connections_makes_a_newcomer_wait() -> None:
    with serve(max_connections=2) as srv, srv.connect() as a, srv.connect() as b:
        for s in (a, b):
            s.sendall(b"GET /block HTTP/1.1\r\nHost: x\r\n\r\n")
        with srv.connect(timeout=0.3) as c:
            c.sendall(GET)
            with pytest.raises(TimeoutError):
                c.recv(1)  # both connections are busy: no one to close
            srv.release()
            for s in (a, b):
                assert read_response(s, bytearray())[0] == 200
            c.settimeout(5)
            assert read_response(c, bytearray())[0] == 200


def test_connections_in_the_middle_of_a_request_are_never_closed_for_a_newcomer() -> None:
    with serve(max_connections=2) as srv, srv.connect() as a, srv.connect() as b:
        a.sendall(b"GET /health HTTP/1.1\r\nHo")  # mid-head
        b.sendall(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\nabc")  # mid-body
        with srv.connect(timeout=0.3) as c:
            c.sendall(GET)
            with pytest.raises(TimeoutError):
                c.recv(1)
            c.settimeout(5)
            assert exchange(a, b"st: x\r\n\r\n")[0] == 200
            # a is idle now, so it is closed for the waiting newcomer
            assert read_response(c, bytearray())[0] == 200
            assert closed_by_peer(a)
            status, _, body = exchange(b, b"def")
            assert (status, body) == (200, b"6:abcdef")


# -- 8. Content-Length and Transfer-Encoding together: answered, then closed --------------------------

CL_AND_TE = (b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
             b"3\r\nabc\r\n0\r\n\r\n")


@pytest.mark.parametrize("path", ["fast", "h11"])
@pytest.mark.parametrize("request_", [
    CL_AND_TE, CL_AND_TE.replace(b"Content-Length: 5\r\nTransfer-Encoding: chunked",
                                 b"Transfer-Encoding: chunked\r\nContent-Length: 99999999")])
def test_content_length_with_transfer_encoding_is_answered_then_closed(path: str, request_: bytes) -> None:
    with serve() as srv, srv.connect() as s:
        if path == "h11":
            assert exchange(s, CHUNKED)[0] == 200
        s.sendall(request_ + GET)  # a request pipelined behind it (smuggled, to a proxy that went by Content-Length)
        buf = bytearray()
        status, headers, body = read_response(s, buf)
        assert (status, body, headers.get("connection")) == (200, b"3:abc", "close")  # chunked framing wins
        assert buf == b"" and closed_by_peer(s)  # and nothing more is answered


# -- 9. the head limit counts raw bytes -----------------------------------------------------------------

def head_of_size(size: int, style: str, eol: bytes = b"\r\n", method: bytes = b"GET",
                 extra: tuple[bytes, ...] = ()) -> bytes:
    """A head of exactly ``size`` raw bytes (its final empty line included), made up to size with whitespace
    the parsers drop: padding after a value ("pad") or folded continuation lines ("fold")."""
    lines = [method + b" /health HTTP/1.1", b"Host: x", *extra, b"X-Pad: a"]
    fill = size - len(eol.join(lines) + eol + eol)
    assert fill > 2 * len(eol) + 60
    if style == "pad":
        lines[-1] += b" " * fill
    else:
        while fill > 2 * len(eol) + 51:
            lines.append(b" " * 50)
            fill -= len(eol) + 50
        lines.append(b"\t" * (fill - len(eol)))
    head = eol.join(lines) + eol + eol
    assert len(head) == size
    return head


@pytest.mark.parametrize("path", ["fast", "h11"])
@pytest.mark.parametrize(("style", "eol"), [("pad", b"\r\n"), ("fold", b"\r\n"), ("pad", b"\n"), ("fold", b"\n")])
@pytest.mark.parametrize(("delta", "status"), [(0, 200), (1, 431), (4, 431), (-1, 200)])
def test_the_head_limit_counts_raw_bytes(path: str, style: str, eol: bytes, delta: int, status: int) -> None:
    head = head_of_size(MAX_HEAD + delta, style, eol)
    with serve() as srv, srv.connect() as s:
        if path == "h11":
            assert exchange(s, CHUNKED)[0] == 200
        got, headers, body = exchange(s, head)
        assert got == status, body
        if status == 431:
            assert json.loads(body)["error"]["code"] == "request_header_fields_too_large"
            assert closed_by_peer(s)
        else:
            assert exchange(s, GET)[0] == 200


# -- the server's decisions, fuzzed against a model built on h11 ---------------------------------------

def h11_accepts(data: bytes) -> bool:
    c = h11.Connection(h11.SERVER)
    c.receive_data(data)
    try:
        if not isinstance(c.next_event(), h11.Request):
            return False
        while True:
            e = c.next_event()
            if isinstance(e, h11.EndOfMessage):
                return True
            if not isinstance(e, h11.Data):
                return False
    except h11.RemoteProtocolError:
        return False


@st.composite
def framed_requests(draw: st.DrawFn) -> tuple[bytes, bool]:
    """A request near the head limit (padded, folded or neither; CRLF or bare LF), framed by Content-Length,
    Transfer-Encoding, both (either order) or neither; and whether it has both."""
    eol = draw(st.sampled_from([b"\r\n", b"\n"]))
    style = draw(st.sampled_from(["pad", "fold", "plain"]))
    framing = draw(st.sampled_from(["none", "cl", "te", "cl+te", "te+cl"]))
    cl = b"Content-Length: " + draw(st.sampled_from([b"3", b"0", b"14", b"99999", b"x"]))
    te = b"Transfer-Encoding: " + draw(st.sampled_from([b"chunked", b"Chunked", b"gzip"]))
    extra = {"none": [], "cl": [b"Content-Length: 3"], "te": [te], "cl+te": [cl, te], "te+cl": [te, cl]}[framing]
    body = b"3\r\nabc\r\n0\r\n\r\n" if "te" in framing else b"abc" if framing == "cl" else b""
    if style == "plain":
        head = eol.join([b"POST /x HTTP/1.1", b"Host: x", *extra]) + eol + eol
    else:
        head = head_of_size(MAX_HEAD + draw(st.integers(-4, 4)), style, eol, b"POST", tuple(extra))
    return head + body, "+" in framing


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[RunningServer]:
    with serve(max_body_size=1024) as srv:
        yield srv


@settings(max_examples=150, deadline=None)
@given(framed_requests(), st.booleans())
@example((CL_AND_TE, True), True)
@example((head_of_size(MAX_HEAD + 1, "fold", b"\n"), False), False)
def test_server_decisions_on_both_paths(fuzz_server: RunningServer, req: tuple[bytes, bool], after_h11: bool) -> None:
    """431 when the raw head is over the limit; else an error when h11 refuses the request; else answered,
    and then closed when it had both Content-Length and Transfer-Encoding, kept open otherwise."""
    data, both = req
    head_size = re.search(rb"\n\r?\n", data).end()  # type: ignore[union-attr]  # where h11 ends a head
    with fuzz_server.connect() as s:
        if after_h11:
            assert exchange(s, CHUNKED)[0] == 200
        s.sendall(data + GET)
        buf = bytearray()
        status, headers, body = read_response(s, buf)
        if not h11_accepts(data):
            assert status >= 400  # (431 too when it is also over the limit: h11 may refuse it first)
        elif head_size > MAX_HEAD:
            assert status == 431
        else:
            assert status == 200 and body in (b"3:abc", b"0:")
            if not both:
                assert read_response(s, buf)[0] == 200  # the pipelined GET
                return
            assert headers["connection"] == "close"
        assert closed_by_peer(s)


class _ClientStream(anyio.abc.ByteStream):
    """A client connection as a memory stream: the test decides exactly when each request arrives."""

    def __init__(self) -> None:
        self.to_server, self._incoming = anyio.create_memory_object_stream[bytes](10)
        self.answers: list[bytes] = []

    async def receive(self, max_bytes: int = 65536) -> bytes:
        return await self._incoming.receive()

    async def send(self, item: bytes) -> None:
        self.answers.append(item)

    async def send_eof(self) -> None:
        pass

    async def aclose(self) -> None:
        self.to_server.close()
        self._incoming.close()

    @property
    def extra_attributes(self) -> Any:
        return {}


def test_an_idle_connection_chosen_as_its_request_arrives_still_answers_it() -> None:
    """The eviction race: the idle connection's next request has been read (its wait completed, so the
    cancellation comes too late) in the same loop turn as a newcomer picks it. The request is answered,
    not dropped; the newcomer finds room afterwards."""
    request = b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n"

    async def handler(req: Any, responder: Any) -> None:
        await responder.send(200, [], b"ok")

    async def main() -> tuple[int, bool]:
        server = Server(handler, ServerSettings(max_connections=1))
        client = _ClientStream()
        async with anyio.create_task_group() as tg:
            server._open = 1  # as _accept_loop counts it
            tg.start_soon(server._connection, client)
            client.to_server.send_nowait(request)
            with anyio.fail_after(5):  # idle, and parked in its read (not merely about to read)
                while server.idle_connections == 0 or client.to_server.statistics().tasks_waiting_receive == 0:
                    await anyio.sleep(0)
            client.to_server.send_nowait(request)  # handed to the waiting read: the idle wait completes...
            with anyio.fail_after(5):
                await server._make_room()  # ...and a newcomer wants room in the same turn
            tg.cancel_scope.cancel()
        return len(client.answers), server._open == 0

    answered, room = anyio.run(main)
    assert answered == 2 and room
