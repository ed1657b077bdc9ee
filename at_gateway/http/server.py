"""Our HTTP/1.1 server, on anyio + h11.

One task per connection runs the h11 state machine: read a request head
(bounded in size and time), read its body (bounded), call the handler, then
either start the next cycle (keep-alive, pipelining) or close. While the
handler runs, a watcher reads ahead on the socket so that a client that goes
away cancels the handler and with it the upstream request.

Limits: a request head within ``header_timeout`` and ``max_header_size`` raw
bytes, a whole body within ``body_timeout`` and ``max_body_size``. At most
``max_connections`` connections; when they are all open, the one idle longest
between requests is closed for a newcomer, which waits only while every
connection is in the middle of a request or has yet to send its first one
(at most ``header_timeout``: a silent connection is closed then).

Graceful shutdown: stop accepting, close idle keep-alive connections, let
requests in flight (streams too) finish within ``shutdown_timeout``, then
cancel what is left.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc
import h11
from anyio.streams.stapled import MultiListener
from anyio.streams.tls import TLSStream

from ..errors import GatewayError, HeadersTooLarge, PayloadTooLarge
from .fastpath import parse_request
from .framing import HeaderValidator, HTTPError

Headers = list[tuple[bytes, bytes]]

log = logging.getLogger("at_gateway.server")

_REASONS = {
    200: b"OK", 204: b"No Content", 400: b"Bad Request", 401: b"Unauthorized", 403: b"Forbidden", 404: b"Not Found",
    405: b"Method Not Allowed", 408: b"Request Timeout", 413: b"Payload Too Large",
    429: b"Too Many Requests", 431: b"Request Header Fields Too Large", 500: b"Internal Server Error",
    501: b"Not Implemented", 502: b"Bad Gateway", 503: b"Service Unavailable", 504: b"Gateway Timeout",
}
_JSON = b"application/json"
# Seconds a handler runs before a watcher task starts reading the socket to notice a client that left.
WATCH_AFTER = 0.02


def call_later(delay: float, func: Callable[..., Any], *args: Any) -> asyncio.TimerHandle | None:
    """A loop timer, far cheaper than a task that sleeps; None when not on asyncio (start eagerly then)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None
    return loop.call_later(delay, func, *args)


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_size: int = 10 * 2**20
    max_header_size: int = 64 * 1024
    header_timeout: float = 10.0
    body_timeout: float = 60.0  # one deadline for the whole request body
    keepalive_timeout: float = 75.0
    max_connections: int = 10000
    shutdown_timeout: float = 30.0
    ssl_context: ssl.SSLContext | None = None
    reuse_port: bool = False
    sock: socket.socket | None = None  # a listening socket opened before fork (workers without SO_REUSEPORT)


class Request:
    """A fully read request. Header names are lowercase bytes (h11 does that)."""

    __slots__ = ("method", "target", "path", "query", "headers", "body", "client")

    def __init__(self, method: bytes, target: bytes, headers: Headers, body: bytes, client: str) -> None:
        self.method = method
        self.target = target
        path, _, query = target.partition(b"?")
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body
        self.client = client

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None


class ClientGone(Exception):
    """The client closed the connection; nothing more can be sent."""


class Responder:
    """Writes one response: whole (:meth:`send`) or streamed (:meth:`start`, :meth:`write`, :meth:`end`)."""

    __slots__ = ("_conn", "_stream", "_server", "_head_only", "close", "started", "finished", "status")

    def __init__(self, conn: h11.Connection, stream: anyio.abc.ByteStream, server: Server,
                 head_only: bool = False, close: bool = False) -> None:
        self._conn = conn
        self._stream = stream
        self._server = server
        self._head_only = head_only  # a HEAD request: the answer's head only (h11 refuses body bytes)
        self.close = close  # the connection closes after this answer: say so (Connection: close)
        self.started = False
        self.finished = False
        self.status = 0

    def _head(self, status: int, headers: Headers) -> bytes:
        if self._server.draining or self.close:
            headers = [*headers, (b"connection", b"close")]
        self._check(headers)
        self.started = True
        self.status = status
        return self._conn.send(h11.Response(status_code=status, headers=headers,
                                            reason=_REASONS.get(status, b"")))

    def _check(self, headers: Headers) -> None:
        """Refuse an illegal header field before anything is sent, so that the error can still be answered
        (h11 refuses it too, but only once its connection state is broken for good)."""
        try:
            self._server.header_validator.check(headers, "response header")
        except HTTPError as exc:
            raise h11.LocalProtocolError(str(exc)) from None

    async def _write(self, data: bytes) -> None:
        try:
            await self._stream.send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            raise ClientGone(str(exc)) from None

    async def send(self, status: int, headers: Headers, body: bytes) -> None:
        headers = [*headers, (b"content-length", str(len(body)).encode())]
        data = self._head(status, headers)
        if body and not self._head_only:
            data += self._conn.send(h11.Data(data=body))
        data += self._conn.send(h11.EndOfMessage())
        self.finished = True
        await self._write(data)

    async def send_json(self, status: int, body: bytes, headers: Headers | None = None) -> None:
        await self.send(status, [(b"content-type", _JSON), *(headers or [])], body)

    async def start(self, status: int, headers: Headers) -> None:
        await self._write(self._head(status, headers))

    async def write(self, data: bytes) -> None:
        if data and not self._head_only:
            await self._write(self._conn.send(h11.Data(data=data)))

    async def end(self, data: bytes = b"") -> None:
        out = self._conn.send(h11.Data(data=data)) if data and not self._head_only else b""
        out += self._conn.send(h11.EndOfMessage())
        self.finished = True
        await self._write(out)


class RawResponder(Responder):
    """A :class:`Responder` for fast-path requests: the bytes h11 would write, without h11.

    Whole answers get Content-Length, streamed ones chunked encoding; ``close`` tells the
    connection loop to close after this response (draining, or the handler said so).
    """

    __slots__ = ("_chunked",)

    def __init__(self, stream: anyio.abc.ByteStream, server: Server) -> None:
        super().__init__(None, stream, server)  # type: ignore[arg-type]
        self._chunked = False

    def _head(self, status: int, headers: Headers) -> bytes:
        if self.started:
            raise h11.LocalProtocolError("response already started")
        if self._server.draining:
            headers = [*headers, (b"connection", b"close")]
        self._check(headers)
        self.started = True
        self.status = status
        out = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b""))]
        for k, v in headers:
            if k == b"connection" and b"close" in v.lower():
                self.close = True
            out += (k, b": ", v, b"\r\n")
        out.append(b"Transfer-Encoding: chunked\r\n\r\n" if self._chunked else b"\r\n")  # h11's spelling
        return b"".join(out)

    async def send(self, status: int, headers: Headers, body: bytes) -> None:
        data = self._head(status, [*headers, (b"content-length", b"%d" % len(body))])
        self.finished = True
        await self._write(data + body if body else data)

    async def start(self, status: int, headers: Headers) -> None:
        self._chunked = not self.started and not any(k == b"content-length" for k, _ in headers)
        await self._write(self._head(status, headers))

    async def write(self, data: bytes) -> None:
        if self.finished or not self.started:
            raise h11.LocalProtocolError("write outside a streamed response")
        if data:
            await self._write(b"%x\r\n%s\r\n" % (len(data), data) if self._chunked else data)

    async def end(self, data: bytes = b"") -> None:
        if self.finished or not self.started:
            raise h11.LocalProtocolError("end outside a streamed response")
        self.finished = True
        if self._chunked:
            await self._write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data) if data else b"0\r\n\r\n")
        else:
            await self._write(data)


Handler = Callable[[Request, Responder], Awaitable[None]]


def _request_id_header() -> tuple[bytes, bytes]:
    """For answers the server gives itself (protocol errors): every answer carries a request id."""
    return (b"x-request-id", os.urandom(12).hex().encode())


class _ConnState:
    __slots__ = ("idle_scope", "busy", "evicted")

    def __init__(self) -> None:
        self.idle_scope: anyio.CancelScope | None = None
        self.busy = False
        self.evicted = False  # closed while idle to make room for a newcomer


class Server:
    def __init__(self, handler: Handler, settings: ServerSettings) -> None:
        self.handler = handler
        self.settings = settings
        self.draining = False
        self.header_validator = HeaderValidator()
        self.port: int | None = None
        self._conns: set[_ConnState] = set()
        self._accept_scope: anyio.CancelScope | None = None
        self._conn_tg: anyio.abc.TaskGroup | None = None
        # The connection cap. Newcomers are accepted first and then wait here for room, so that an idle
        # connection is closed only when someone actually needs its slot.
        self._open = 0  # connections counted against max_connections
        self._closing = 0  # of them, evicted ones not closed yet
        self._wanting = 0  # accepted newcomers waiting for room
        self._room: anyio.Event | None = None  # set when a connection closes or goes idle, while newcomers wait
        # Keep-alive connections between requests, in the order they went idle (dicts keep insertion order):
        # the first is the one idle longest.
        self._idle: dict[_ConnState, None] = {}
        self._idle_event: anyio.Event | None = None
        self._listener: Any = None  # anyio MultiListener of SocketListeners

    # -- lifecycle ------------------------------------------------------
    async def bind(self) -> int:
        """Open the listening socket (errors surface here, before any task starts)."""
        if self._listener is None:
            s = self.settings
            if s.sock is not None:
                self._listener = MultiListener([await anyio.abc.SocketListener.from_socket(s.sock)])
            else:
                self._listener = await anyio.create_tcp_listener(local_host=s.host, local_port=s.port,
                                                                 reuse_port=s.reuse_port, backlog=1024)
            self.port = self._listener.extra(anyio.abc.SocketAttribute.local_port)
        assert self.port is not None
        return self.port

    async def serve(self, *, task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        port = await self.bind()
        listener = self._listener
        assert listener is not None
        try:
            async with anyio.create_task_group() as conn_tg:
                self._conn_tg = conn_tg
                with anyio.CancelScope() as accept_scope:
                    self._accept_scope = accept_scope
                    if self.draining:
                        accept_scope.cancel()
                    task_status.started(port)
                    async with anyio.create_task_group() as accept_tg:
                        for sub in listener.listeners:
                            accept_tg.start_soon(self._accept_loop, sub, conn_tg)
                await listener.aclose()
                await self._drain(conn_tg)
        finally:
            await listener.aclose()

    def shutdown(self) -> None:
        """Begin a graceful shutdown (idempotent; safe from a signal-handling task)."""
        if self.draining:
            return
        self.draining = True
        if self._accept_scope is not None:
            self._accept_scope.cancel()
        for st in list(self._conns):
            if not st.busy and st.idle_scope is not None:
                st.idle_scope.cancel()

    async def _drain(self, conn_tg: anyio.abc.TaskGroup) -> None:
        with anyio.move_on_after(self.settings.shutdown_timeout):
            while self._conns:
                self._idle_event = anyio.Event()
                for st in list(self._conns):
                    if not st.busy and st.idle_scope is not None:
                        st.idle_scope.cancel()
                await self._idle_event.wait()
            return
        log.warning("shutdown timeout reached with %d connection(s) still open; closing them", len(self._conns))
        conn_tg.cancel_scope.cancel()

    def _changed(self) -> None:
        if self._idle_event is not None:
            self._idle_event.set()

    @property
    def idle_connections(self) -> int:
        """Keep-alive connections waiting for their next request (the ones a newcomer may displace)."""
        return len(self._idle)

    def _wake_newcomers(self) -> None:
        if self._room is not None:
            self._room.set()
            self._room = None

    def _go_idle(self, st: _ConnState) -> None:
        """``st`` waits for its next request: it may be closed for a newcomer from now on."""
        self._idle[st] = None
        if self._room is not None:  # a newcomer is waiting for exactly this
            self._wake_newcomers()

    def _spare(self, st: _ConnState) -> None:
        """Undo an eviction whose cancellation came too late: the connection's next request was already read
        (anyio does not cancel a wait that completed), and dropping it unanswered would lose it. The
        newcomer looks for room again."""
        st.evicted = False
        self._closing -= 1
        self._wake_newcomers()

    async def _make_room(self) -> None:
        """Wait until a newcomer (already accepted) fits under max_connections: close the connection idle
        longest for it, or, while every connection is in the middle of a request (or new and silent, which
        header_timeout bounds), wait for one to end or to go idle. A connection mid-head, mid-body or
        mid-answer is never closed for a newcomer."""
        limit = self.settings.max_connections
        self._wanting += 1
        try:
            while self._open >= limit:
                # Close one more only if the closings under way do not already make room for every newcomer.
                if self._idle and self._open - self._closing + self._wanting > limit:
                    st = next(iter(self._idle))
                    del self._idle[st]
                    st.evicted = True
                    self._closing += 1
                    if st.idle_scope is not None:
                        st.idle_scope.cancel()
                    continue
                if self._room is None:
                    self._room = anyio.Event()
                await self._room.wait()
        finally:
            self._wanting -= 1

    async def _accept_loop(self, listener: anyio.abc.SocketListener, tg: anyio.abc.TaskGroup) -> None:
        failing = False
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:  # out of file descriptors (EMFILE) and the like: wait, never stop serving
                if not failing:
                    log.warning("cannot accept connections (%s); retrying every 0.1 s", exc.strerror or exc)
                failing = True
                await anyio.sleep(0.1)
                continue
            failing = False
            if self._open >= self.settings.max_connections:
                try:
                    await self._make_room()
                except BaseException:  # shutting down: the newcomer never gets served
                    with anyio.CancelScope(shield=True):
                        await anyio.aclose_forcefully(stream)
                    raise
            self._open += 1
            tg.start_soon(self._connection, stream)

    # -- one connection -------------------------------------------------
    async def _connection(self, raw: anyio.abc.SocketStream) -> None:
        st = _ConnState()
        self._conns.add(st)
        stream: anyio.abc.ByteStream = raw
        client = "?"
        try:
            try:
                client = "%s:%s" % raw.extra(anyio.abc.SocketAttribute.remote_address)[:2]
            except Exception:
                pass
            if self.settings.ssl_context is not None:
                try:
                    with anyio.fail_after(self.settings.header_timeout):
                        stream = await TLSStream.wrap(raw, server_side=True, ssl_context=self.settings.ssl_context,
                                                      standard_compatible=False)
                except (TimeoutError, ssl.SSLError, OSError, anyio.BrokenResourceError, anyio.EndOfStream):
                    return
            await self._serve_connection(stream, st, client)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, ClientGone, OSError):
            pass
        except Exception:  # whatever goes wrong on one connection must not take the server down with it
            log.exception("unexpected error on the connection from %s; closing it", client)
        finally:
            self._conns.discard(st)
            self._idle.pop(st, None)
            self._open -= 1
            if st.evicted:
                self._closing -= 1
            self._wake_newcomers()
            self._changed()
            with anyio.CancelScope(shield=True):
                await anyio.aclose_forcefully(stream)

    async def _receive(self, stream: anyio.abc.ByteStream) -> bytes:
        """The next bytes from the client; b"" once it is gone. OSError includes ssl.SSLError: a corrupt TLS
        record (anyio re-raises it as is) ends this connection, nothing else (the watcher runs in a task group,
        where an escaping error would take down the whole server)."""
        try:
            return await stream.receive(65536)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            return b""

    async def _serve_connection(self, stream: anyio.abc.ByteStream, st: _ConnState, client: str) -> None:
        """Serve requests of the common shape on the fast path (:func:`.fastpath.parse_request`: our own
        parsing and framing, a fraction of h11's cost); at the first request of any other shape, hand
        the connection and the bytes read so far to h11 for good (:meth:`_serve_h11`)."""
        s = self.settings
        buf = b""
        first = True
        while True:
            if not buf:
                with anyio.CancelScope() as idle:
                    st.idle_scope = idle
                    if self.draining:
                        return
                    if first:  # a new connection's first request is not a keep-alive wait: never displaced
                        idle.deadline = anyio.current_time() + s.header_timeout
                    else:
                        idle.deadline = anyio.current_time() + s.keepalive_timeout
                        self._idle[st] = None  # (_go_idle, inlined on the hot path)
                        if self._room is not None:
                            self._wake_newcomers()
                    buf = await self._receive(stream)
                st.idle_scope = None
                self._idle.pop(st, None)
                if idle.cancelled_caught or not buf:
                    return
                if st.evicted:  # chosen for a newcomer just as its next request arrived: serve it after all
                    self._spare(st)
            first = False
            parsed = parse_request(buf, s.max_header_size, s.max_body_size)
            if parsed is None:
                conn = h11.Connection(h11.SERVER, max_incomplete_event_size=s.max_header_size)
                conn.receive_data(buf)
                await self._serve_h11(stream, st, client, conn)
                return
            st.busy = True
            method, target, headers, length, start = parsed
            end = start + length
            if len(buf) >= end:
                body, buf = buf[start:end], buf[end:]
            else:  # the rest of the body, all of it within body_timeout however slowly it trickles in
                parts = [buf[start:]]
                size = len(parts[0])
                with anyio.move_on_after(s.body_timeout) as late:
                    while size < length:
                        data = await self._receive(stream)
                        if not data:
                            return
                        parts.append(data)
                        size += len(data)
                if late.cancelled_caught:
                    await self._error_and_close(h11.Connection(h11.SERVER), stream, 408,
                                                "request body not received in time", "request_timeout")
                    return
                whole = b"".join(parts)
                body, buf = whole[:length], whole[length:]
            responder = RawResponder(stream, self)
            extra: list[bytes] = []
            gone = await self._run_handler(Request(method, target, headers, body, client), responder, extra.append,
                                           stream)
            st.busy = False
            self._changed()
            if extra:  # pipelined bytes the watcher read meanwhile
                buf += b"".join(extra)
            if gone or not responder.finished or responder.close or self.draining:
                return

    async def _serve_h11(self, stream: anyio.abc.ByteStream, st: _ConnState, client: str,
                         conn: h11.Connection) -> None:
        """The rest of a connection on h11 (``conn`` already holds the bytes read)."""
        s = self.settings
        while True:
            # Phase 1: wait (idle) for the first byte of the next request (the connection's first request
            # came on the fast path, so this is always a keep-alive wait). ``avail``: the bytes h11 holds,
            # to count the raw size of the head it takes from them.
            pending, closed = conn.trailing_data
            if pending or closed:
                avail = len(pending)
            else:
                data = b""
                with anyio.CancelScope() as idle:
                    st.idle_scope = idle
                    if self.draining:
                        return
                    idle.deadline = anyio.current_time() + s.keepalive_timeout
                    self._go_idle(st)
                    data = await self._receive(stream)
                    conn.receive_data(data)
                st.idle_scope = None
                self._idle.pop(st, None)
                if idle.cancelled_caught or not data:
                    return
                if st.evicted:
                    self._spare(st)
                avail = len(data)
            st.busy = True
            # Phase 2: the rest of the head, within header_timeout (slowloris).
            try:
                event = conn.next_event()  # the whole head usually came with the first read: no timer then
                if event is h11.NEED_DATA:
                    with anyio.fail_after(s.header_timeout):
                        while event is h11.NEED_DATA:
                            data = await self._receive(stream)
                            conn.receive_data(data)
                            avail += len(data)
                            event = conn.next_event()
            except TimeoutError:
                await self._error_and_close(conn, stream, 408, "request head not received in time", "request_timeout")
                return
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                if status == 431:
                    await self._error_and_close(conn, stream, 431,
                                                f"request head larger than {s.max_header_size} bytes",
                                                HeadersTooLarge.code)
                else:
                    await self._error_and_close(conn, stream, status, f"malformed HTTP request: {exc}", "bad_request")
                return
            if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return
            if not isinstance(event, h11.Request):
                return
            # The head's raw size (request line, names, values, whitespace, folded lines, line ends): what h11
            # took of the bytes it held. h11 itself bounds only a head still incomplete.
            if avail - len(conn.trailing_data[0]) > s.max_header_size:
                await self._error_and_close(conn, stream, 431, f"request head larger than {s.max_header_size} bytes",
                                            HeadersTooLarge.code)
                return
            request_headers = list(event.headers)
            clen = None
            chunked = False
            for k, v in request_headers:
                if k == b"content-length":
                    clen = int(v)
                elif k == b"transfer-encoding":
                    chunked = True
            # Both Content-Length and Transfer-Encoding: h11 reads the body by Transfer-Encoding, but something
            # in front of us may have framed it by Content-Length, so the bytes after it cannot be trusted to
            # start a request: answer, then close (RFC 9112 section 6.1).
            close = chunked and clen is not None
            if chunked:
                clen = None  # not this body's length; its size is bounded while it is read
            # Body: bounded in size; Expect: 100-continue answered only if we'll read it.
            if clen is not None and clen > s.max_body_size:
                await self._error_and_close(conn, stream, 413, f"request body larger than {s.max_body_size} bytes",
                                            PayloadTooLarge.code)
                return
            if conn.they_are_waiting_for_100_continue:
                await stream.send(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
            body_parts: list[bytes] = []
            size = 0
            deadline = None
            try:
                while True:
                    ev = conn.next_event()
                    if ev is h11.NEED_DATA:
                        if deadline is None:  # one deadline for the whole body, however slowly it trickles in
                            deadline = anyio.current_time() + s.body_timeout
                        with anyio.fail_after(deadline - anyio.current_time()):
                            ev = await self._next_event(conn, stream)
                    if isinstance(ev, h11.Data):
                        size += len(ev.data)
                        if size > s.max_body_size:
                            await self._error_and_close(conn, stream, 413,
                                                        f"request body larger than {s.max_body_size} bytes",
                                                        PayloadTooLarge.code)
                            return
                        body_parts.append(bytes(ev.data))
                    elif isinstance(ev, h11.EndOfMessage):
                        break
                    else:  # ConnectionClosed mid-body
                        return
            except TimeoutError:
                await self._error_and_close(conn, stream, 408, "request body not received in time", "request_timeout")
                return
            except h11.RemoteProtocolError as exc:
                await self._error_and_close(conn, stream, 400, f"malformed HTTP request: {exc}", "bad_request")
                return
            body = body_parts[0] if len(body_parts) == 1 else b"".join(body_parts)
            request = Request(event.method, event.target, request_headers, body, client)
            responder = Responder(conn, stream, self, head_only=event.method == b"HEAD", close=close)
            gone = await self._run_handler(request, responder, conn.receive_data, stream)
            st.busy = False
            self._changed()
            if gone or not responder.finished:
                return
            if close:  # what follows may be a smuggled request: never read it, let the answer arrive intact
                await self._linger_close(stream)
                return
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE or self.draining:
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return

    async def _run_handler(self, request: Request, responder: Responder, sink: Callable[[bytes], Any],
                           stream: anyio.abc.ByteStream) -> bool:
        """Run the handler while watching the socket; return True if the client went away."""
        gone = False

        async def watch(scope: anyio.CancelScope) -> None:
            nonlocal gone
            buffered = 0
            while True:
                data = await self._receive(stream)
                if not data:
                    gone = True
                    scope.cancel()
                    return
                buffered += len(data)
                sink(data)  # pipelined requests wait in the connection's buffer
                if buffered > self.settings.max_header_size + self.settings.max_body_size:
                    await anyio.sleep_forever()

        watching = False

        def start_watch() -> None:
            nonlocal watching
            watching = True
            tg.start_soon(watch, tg.cancel_scope)

        async with anyio.create_task_group() as tg:
            # Most answers are done within milliseconds, and a task per request is one of the largest
            # fixed costs of a request: the watcher starts only once the handler has run WATCH_AFTER.
            timer = call_later(WATCH_AFTER, start_watch)
            if timer is None:
                start_watch()
            try:
                await self._call_handler(request, responder)
                if responder.started and not responder.finished:
                    gone = True  # a started response that did not end: close to signal truncation
            except ClientGone:
                gone = True
            finally:
                if timer is not None:
                    timer.cancel()
            if watching:  # cancelling costs even with nothing to cancel
                tg.cancel_scope.cancel()
        return gone

    async def _call_handler(self, request: Request, responder: Responder) -> None:
        """Run the handler; turn its errors into responses (raises only ClientGone)."""
        try:
            await self.handler(request, responder)
        except ClientGone:
            raise
        except GatewayError as exc:
            if responder.started:
                raise ClientGone("error after the response started") from None
            await responder.send_json(exc.status, exc.to_body(), [*exc.headers, _request_id_header()])
        except Exception:
            log.exception("unhandled error in handler")
            if responder.started:
                raise ClientGone("error after the response started") from None
            await responder.send_json(500, GatewayError("internal error").to_body(), [_request_id_header()])

    async def _next_event(self, conn: h11.Connection, stream: anyio.abc.ByteStream) -> Any:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await self._receive(stream))
                continue
            return event

    async def _error_and_close(self, conn: h11.Connection, stream: anyio.abc.ByteStream, status: int,
                               message: str, code: str) -> None:
        """Answer a protocol-level error, then close: the connection's framing can't be trusted."""
        body = GatewayError(message, code=code, type="invalid_request_error").to_body()
        headers = [(b"content-type", _JSON), (b"content-length", str(len(body)).encode()),
                   _request_id_header(), (b"connection", b"close")]
        try:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                data = conn.send(h11.Response(status_code=status, headers=headers, reason=_REASONS.get(status, b"")))
                data += conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
            else:
                return
        except h11.LocalProtocolError:
            # h11 refuses to respond before it saw a request: write it by hand.
            data = b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b""))
            data += b"".join(k + b": " + v + b"\r\n" for k, v in headers) + b"\r\n" + body
        try:
            with anyio.fail_after(5):
                await stream.send(data)
        except (TimeoutError, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            return
        await self._linger_close(stream)

    async def _linger_close(self, stream: anyio.abc.ByteStream) -> None:
        """Stop sending, then drop what the client is still sending for a moment (the connection closes next).
        Closing with unread input makes the kernel send RST, which can destroy the answer in flight."""
        try:
            try:
                await stream.send_eof()  # type: ignore[attr-defined]
            except (NotImplementedError, AttributeError):
                pass  # TLS has no half-close: the answer said Connection: close, so drain all the same
            with anyio.move_on_after(1.0):
                drained = 0
                while drained < 1 << 20:
                    drained += len(await stream.receive(65536))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream,
                NotImplementedError, AttributeError, OSError):
            pass
