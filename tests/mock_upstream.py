"""A real HTTP/1.1 mock upstream for tests, in a thread, on 127.0.0.1.

Behaviour is chosen per request by the ``model`` in the JSON body (or the
path, for non-JSON requests), so one server can play every upstream a route
needs: JSON answers with any status, SSE streams, delays, resets mid-body,
malformed bodies. Every request it receives is recorded.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    status: int = 200
    body: Any = None  # dict/list -> JSON; bytes/str -> raw
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # before the status line
    sse: list[Any] | None = None  # events: dict -> data: JSON; str -> raw data; bytes -> raw event bytes
    sse_delay: float = 0.0  # between events
    done: bool = True  # send data: [DONE] after the events
    reset_after: int | None = None  # SSE: reset the connection after this many events
    reset: bool = False  # reset before answering at all
    truncate: bool = False  # JSON: announce more bytes than sent, then close
    close: bool = False  # Connection: close after the answer
    hold: threading.Event | None = None  # SSE: before event number hold_after, wait (at most 10 s) for this
    hold_after: int = 1


def chat_completion(content: str = "hello", model: str = "m", usage: dict[str, int] | None = None,
                    **extra: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-mock", "object": "chat.completion", "created": 1, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": usage or {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}, **extra,
    }


def chunk(content: str | None = None, finish: str | None = None, role: bool = False, model: str = "m",
          usage: dict[str, int] | None = None, choices: bool = True) -> dict[str, Any]:
    delta: dict[str, Any] = {}
    if role:
        delta["role"] = "assistant"
    if content is not None:
        delta["content"] = content
    out: dict[str, Any] = {"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1, "model": model,
                           "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if choices else []}
    if usage is not None:
        out["usage"] = usage
    return out


def stream_of(*words: str, usage: bool = True) -> list[Any]:
    events: list[Any] = [chunk("", role=True)]
    events += [chunk(w) for w in words]
    events.append(chunk(finish="stop"))
    if usage:
        events.append(chunk(choices=False, usage={"prompt_tokens": 2, "completion_tokens": len(words),
                                                  "total_tokens": 2 + len(words)}))
    return events


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    raw_headers: list[tuple[str, str]] = field(default_factory=list)  # as sent, repeats included

    @property
    def json(self) -> Any:
        return json.loads(self.body)


class MockUpstream:
    def __init__(self, tls: tuple[str, str] | None = None) -> None:
        self.replies: dict[str, Reply | Callable[[Received], Reply]] = {}
        self.default: Reply = Reply(body=chat_completion())
        self.received: list[Received] = []
        self.connections = 0
        self.hold_timeouts = 0  # holds that nobody released in time
        self._stop = threading.Event()
        mock = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                mock.connections += 1

            def do_GET(self) -> None:
                self._handle()

            def do_POST(self) -> None:
                self._handle()

            def _handle(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                rec = Received(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body,
                               list(self.headers.items()))
                mock.received.append(rec)
                key = self.path
                try:
                    key = json.loads(body).get("model", self.path)
                except (ValueError, AttributeError):
                    pass
                reply = mock.replies.get(key) or mock.replies.get(self.path) or mock.default
                if callable(reply):
                    reply = reply(rec)
                mock._serve(self, reply)

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        if tls is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*tls)
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
            self.url = f"https://localhost:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)

    def start(self) -> MockUpstream:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)

    def _sleep(self, seconds: float) -> None:
        if seconds:
            self._stop.wait(seconds)

    def _serve(self, h: BaseHTTPRequestHandler, r: Reply) -> None:
        self._sleep(r.delay)
        if r.reset:
            _reset(h.connection)
            h.close_connection = True
            return
        if r.sse is not None:
            h.send_response(r.status)
            h.send_header("content-type", "text/event-stream")
            h.send_header("transfer-encoding", "chunked")
            for k, v in r.headers.items():
                h.send_header(k, v)
            h.end_headers()
            for i, ev in enumerate(r.sse):
                if r.reset_after is not None and i >= r.reset_after:
                    _reset(h.connection)
                    h.close_connection = True
                    return
                if r.hold is not None and i == r.hold_after and not r.hold.wait(10):
                    self.hold_timeouts += 1
                if isinstance(ev, bytes):
                    data = ev
                elif isinstance(ev, str):
                    data = f"data: {ev}\n\n".encode()
                else:
                    data = f"data: {json.dumps(ev)}\n\n".encode()
                _chunk(h, data)
                self._sleep(r.sse_delay)
            if r.reset_after is not None and r.reset_after >= len(r.sse):
                _reset(h.connection)
                h.close_connection = True
                return
            if r.done:
                _chunk(h, b"data: [DONE]\n\n")
            h.wfile.write(b"0\r\n\r\n")
            h.wfile.flush()
            if r.close:
                h.close_connection = True
            return
        if isinstance(r.body, (dict, list)):
            data = json.dumps(r.body).encode()
            ctype = "application/json"
        elif isinstance(r.body, str):
            data, ctype = r.body.encode(), "text/plain"
        else:
            data, ctype = (r.body or b""), "application/octet-stream"
        h.send_response(r.status)
        h.send_header("content-type", r.headers.get("content-type", ctype))
        h.send_header("content-length", str(len(data) + (100 if r.truncate else 0)))
        for k, v in r.headers.items():
            if k.lower() != "content-type":
                h.send_header(k, v)
        if r.close:
            h.send_header("connection", "close")
        h.end_headers()
        h.wfile.write(data)
        h.wfile.flush()
        if r.truncate:
            _reset(h.connection)
            h.close_connection = True
        elif r.close:
            h.close_connection = True


class _Server(ThreadingHTTPServer):
    request_queue_size = 1024  # many concurrent test connections must not wait for SYN retries
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that go away mid-answer are what some tests are about


def _chunk(h: BaseHTTPRequestHandler, data: bytes) -> None:
    h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
    h.wfile.flush()


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), the way a crashing upstream looks."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()
    except OSError:
        pass


def wait_until(pred: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll a condition (for state owned by another thread), failing after a deadline."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.005)
    return pred()
