"""Upstreams that fail in one precise way, on raw sockets, for the resilience fault matrix.

:class:`tests.mock_upstream.MockUpstream` is built on ``http.server``, which cannot stop half-way through a
status line or answer a TLS ClientHello with plain bytes. A :class:`FaultServer` reads each request itself
(recording its ``Authorization`` header, so a test knows which provider key was used), then hands the socket
to one *behaviour*: a function that writes whatever the fault is and says whether the connection stays open
for another request. Every connection it accepted is counted, and :attr:`FaultServer.open` says how many the
gateway has not closed yet: a fault that leaves the gateway's socket open would show there.

Everything runs in threads and stops in :meth:`FaultServer.stop` (a context manager too): nothing outlives a
test. The holds (``hold``) end when the peer closes or the server stops; they are the upstream's side, never a
test's synchronisation.
"""

from __future__ import annotations

import json
import selectors
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tests.mock_upstream import chunk


@dataclass
class Seen:
    """One request as the upstream read it."""

    authorization: str | None
    model: str | None
    stream: bool


# A behaviour writes the answer (or the fault) to the socket; True keeps the connection for another request.
Behaviour = Callable[["FaultServer", socket.socket, Seen], bool]

_POLL = 0.05  # how often the server's own threads look at their stop flag


class FaultServer:
    """One upstream on 127.0.0.1 whose every answer is ``behaviour`` (see the factories below).

    ``raw``: called with the fresh connection instead of reading HTTP (for an https URL at a plain server:
    what arrives is a TLS ClientHello). ``tls``: a server context the connection is wrapped in first (a
    certificate the gateway does not trust: the handshake fails on its side)."""

    def __init__(self, behaviour: Behaviour | None = None, *, raw: Callable[[socket.socket], None] | None = None,
                 tls: ssl.SSLContext | None = None) -> None:
        self.behaviour = behaviour or answer(200, _completion())
        self.raw = raw
        self.tls = tls
        self.seen: list[Seen] = []
        self.connections = 0  # accepted
        self.open = 0  # accepted and not yet closed
        self.peer_closed = 0  # holds that ended because the gateway closed its side
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"{'https' if tls or raw else 'http'}://127.0.0.1:{self.port}"
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []
        self._acceptor = threading.Thread(target=self._accept, daemon=True)

    # -- life -------------------------------------------------------------------------------------------------
    def start(self) -> FaultServer:
        self._acceptor.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._acceptor.join(5)
        self._listener.close()
        with self._lock:
            socks, threads = list(self._socks), list(self._threads)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in threads:
            t.join(5)

    def __enter__(self) -> FaultServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def keys_used(self) -> list[str | None]:
        """The bearer token of every request received, in order."""
        return [s.authorization[len("Bearer "):] if s.authorization else None for s in self.seen]

    # -- serving ----------------------------------------------------------------------------------------------
    def _accept(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self._listener, selectors.EVENT_READ)
            while not self._stop.is_set():
                if not sel.select(_POLL):
                    continue
                try:
                    sock, _ = self._listener.accept()
                except OSError:
                    continue
                with self._lock:
                    self.connections += 1
                    self.open += 1
                    self._socks.append(sock)
                    t = threading.Thread(target=self._serve, args=(sock,), daemon=True)
                    self._threads.append(t)
                t.start()

    def _serve(self, sock: socket.socket) -> None:
        conn: socket.socket = sock
        try:
            if self.raw is not None:
                self.raw(sock)
                return
            if self.tls is not None:
                conn = self.tls.wrap_socket(sock, server_side=True)  # raises: the client refused our certificate
            buf = b""
            while not self._stop.is_set():
                seen, buf = self._read_request(conn, buf)
                if seen is None:
                    return
                self.seen.append(seen)
                if not self.behaviour(self, conn, seen):
                    return
        except (OSError, ValueError):
            pass
        finally:
            try:
                conn.close()
            except OSError:
                pass
            with self._lock:
                self.open -= 1

    def _read_request(self, sock: socket.socket, buf: bytes) -> tuple[Seen | None, bytes]:
        sock.settimeout(_POLL)
        while b"\r\n\r\n" not in buf:
            data = self._recv(sock)
            if not data:
                return None, b""
            buf += data
        head, _, buf = buf.partition(b"\r\n\r\n")
        headers: dict[str, str] = {}
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length") or 0)
        while len(buf) < length:
            data = self._recv(sock)
            if not data:
                return None, b""
            buf += data
        body, buf = buf[:length], buf[length:]
        try:
            obj = json.loads(body)
        except ValueError:
            obj = {}
        return Seen(headers.get("authorization"), obj.get("model"), bool(obj.get("stream"))), buf

    def _recv(self, sock: socket.socket) -> bytes:
        """Bytes from the peer; b"" when it closed (or the server stops)."""
        while not self._stop.is_set():
            try:
                return sock.recv(65536)
            except (TimeoutError, ssl.SSLWantReadError):
                continue
            except OSError:
                return b""
        return b""

    def hold(self, sock: socket.socket) -> None:
        """Say nothing more until the peer closes (counted in :attr:`peer_closed`) or the server stops."""
        sock.settimeout(_POLL)
        while not self._stop.is_set():
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                data = b""
            if not data:
                with self._lock:
                    self.peer_closed += 1
                return


# -- what goes on the wire ------------------------------------------------------------------------------------------
def _completion() -> dict[str, Any]:
    return {"id": "chatcmpl-fault", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


FIRST_EVENT = b"data: " + json.dumps(chunk("", role=True)).encode() + b"\n\n"
"""The first (and only) stream event the stream faults send before they break."""
FIRST_JSON_PIECE = b'{"id":"chatcmpl-fault","object":"chat.completion",'
"""The first chunk of a chunked JSON answer that never ends (the non-stream form of the stream faults)."""


def _chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _head(status: int, ctype: str, extra: dict[str, str] | None = None, length: int | None = None) -> bytes:
    lines = [f"HTTP/1.1 {status} X", f"Content-Type: {ctype}"]
    lines.append(f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked")
    lines += [f"{k}: {v}" for k, v in (extra or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def reset(sock: socket.socket) -> None:
    """Make the close that follows an RST (SO_LINGER 0): a crashing upstream, or a middlebox dropping it."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    except OSError:
        pass


def answer(status: int, body: Any, headers: dict[str, str] | None = None) -> Behaviour:
    """A whole answer with a Content-Length (JSON for a dict, else the text as is); the connection is kept."""
    data = json.dumps(body).encode() if isinstance(body, dict) else str(body).encode()
    ctype = "application/json" if isinstance(body, dict) else "text/html"

    def behave(server: FaultServer, sock: socket.socket, seen: Seen) -> bool:
        sock.sendall(_head(status, ctype, headers, len(data)) + data)
        return True

    return behave


def reset_in_head() -> Behaviour:
    """Half a status line and headers, then RST."""
    def behave(server: FaultServer, sock: socket.socket, seen: Seen) -> bool:
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Ty")
        reset(sock)
        return False

    return behave


def reset_in_body() -> Behaviour:
    """The head and part of the body, then RST: a JSON answer that promised more bytes; for a stream, the SSE
    head and half of its first event (nothing whole reached the gateway)."""
    def behave(server: FaultServer, sock: socket.socket, seen: Seen) -> bool:
        if seen.stream:
            sock.sendall(_head(200, "text/event-stream") + _chunked(FIRST_EVENT[:20]))
        else:
            sock.sendall(_head(200, "application/json", length=500) + FIRST_JSON_PIECE)
        reset(sock)
        return False

    return behave


def silent() -> Behaviour:
    """No answer at all: the request was read, the head never comes (until the gateway gives up)."""
    def behave(server: FaultServer, sock: socket.socket, seen: Seen) -> bool:
        server.hold(sock)
        return False

    return behave


def garbage() -> Behaviour:
    """Bytes that are not HTTP, then a clean close."""
    def behave(server: FaultServer, sock: socket.socket, seen: Seen) -> bool:
        sock.sendall(b"SSH-2.0-OpenSSH_9.6\r\n\x00\xff\xfe not an HTTP answer\r\n\r\n")
        return False

    return behave


def first_chunk_then(after: str) -> Behaviour:
    """The head and a first chunk (a whole SSE event for a stream; the start of a chunked JSON body
    otherwise), then ``after``: ``"cut"`` (a clean close, with no terminating chunk) or ``"stall"``
    (silence until the gateway closes)."""
    def behave(server: FaultServer, sock: socket.socket, seen: Seen) -> bool:
        if seen.stream:
            sock.sendall(_head(200, "text/event-stream") + _chunked(FIRST_EVENT))
        else:
            sock.sendall(_head(200, "application/json") + _chunked(FIRST_JSON_PIECE))
        if after == "stall":
            server.hold(sock)
        return False

    return behave


def plain_reply_to_tls(sock: socket.socket) -> None:
    """For ``raw``: a plain-HTTP server reached with https: it reads the ClientHello and answers in plain text."""
    sock.settimeout(2)
    try:
        sock.recv(65536)
        sock.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    except OSError:
        pass


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A server TLS context for ``tls=`` (a self-signed certificate: the gateway does not trust it)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


def refused_port() -> socket.socket:
    """A socket bound to a port and not listening: connecting to it is refused. Close it after the test."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return sock
