"""A fast mock OpenAI-compatible upstream for benchmarks: stdlib asyncio only.

Why not the test mock: that one is a thread per connection and decodes every
body, so it would be the bottleneck and we would measure it instead of the
gateway. This one is an ``asyncio.Protocol`` with precomputed answers: it reads
the request head and body, looks only at a few byte patterns in the body, and
writes the whole answer in one ``write`` (HTTP/1.1 keep-alive, pipelining safe).

Behaviour, chosen from the body bytes:

* ``"stream":true`` (any spacing): an SSE stream of ``--chunks`` chat chunks,
  the last with ``finish_reason``, then a usage-only chunk and ``[DONE]``,
  chunked transfer encoding;
* otherwise a chat completion JSON with ``usage``;
* model ``bench-fail``: 500 with an OpenAI error body (soak: upstream errors);
* model ``bench-cut`` with ``stream``: three chunks, then the connection is
  reset (soak: a stream that breaks after its first chunk).

``--delay`` waits before answering; ``--chunk-delay`` spaces stream chunks
(both in seconds, default 0: everything in one write). ``GET /stats`` answers
counters (requests, streams started/finished/aborted, open streams) so the
soak can check that client disconnects cancel the upstream request.

Prints ``PORT <n>`` on stdout once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import socket
import struct
import sys

_STREAM_RE = re.compile(rb'"stream"\s*:\s*true')
_MODEL_RE = re.compile(rb'"model"\s*:\s*"([^"]*)"')


def _chunk_event(i: int, content: str | None, finish: str | None, role: bool = False) -> bytes:
    delta: dict[str, object] = {}
    if role:
        delta["role"] = "assistant"
    if content is not None:
        delta["content"] = content
    obj = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000, "model": "bench-model",
           "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class Answers:
    """Every answer the mock gives, built once."""

    def __init__(self, chunks: int) -> None:
        completion = {
            "id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000, "model": "bench-model",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello from the bench mock."},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19},
        }
        body = json.dumps(completion, separators=(",", ":")).encode()
        self.json = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body)
                     + body)
        err = b'{"error":{"message":"bench mock: induced upstream failure","type":"server_error","code":null}}'
        self.error = (b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\n"
                      b"content-length: %d\r\n\r\n" % len(err) + err)
        self.not_found = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"
        self.sse_head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        events = [_chunk_event(0, "", None, role=True)]
        events += [_chunk_event(i, f"tok{i} ", None) for i in range(1, max(chunks - 1, 1))]
        events.append(_chunk_event(chunks, None, "stop"))
        usage = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000,
                 "model": "bench-model", "choices": [],
                 "usage": {"prompt_tokens": 12, "completion_tokens": chunks, "total_tokens": 12 + chunks}}
        events.append(b"data: " + json.dumps(usage, separators=(",", ":")).encode() + b"\n\n")
        events.append(b"data: [DONE]\n\n")
        self.sse_events = [_chunked(e) for e in events]
        self.sse_end = b"0\r\n\r\n"
        self.sse_whole = self.sse_head + b"".join(self.sse_events) + self.sse_end


class Stats:
    def __init__(self) -> None:
        self.requests = 0
        self.streams_started = 0
        self.streams_finished = 0
        self.streams_aborted = 0
        self.errors = 0
        self.cuts = 0
        self.open_streams = 0
        self.connections = 0

    def body(self) -> bytes:
        return json.dumps(self.__dict__).encode()


class MockProtocol(asyncio.Protocol):
    def __init__(self, answers: Answers, stats: Stats, delay: float, chunk_delay: float) -> None:
        self.answers = answers
        self.stats = stats
        self.delay = delay
        self.chunk_delay = chunk_delay
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.busy = False  # a delayed/streamed answer is in progress: queue the rest
        self.closed = False
        self.stream_task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.stats.connections += 1
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.stream_task is not None and not self.stream_task.done():
            self.stream_task.cancel()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._process()

    def _process(self) -> None:
        """Answer every complete request in the buffer (immediate answers inline)."""
        while not self.busy and not self.closed:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end]
            length = 0
            lower = head.lower()
            i = lower.find(b"\r\ncontent-length:")
            if i >= 0:
                j = lower.find(b"\r\n", i + 2)
                length = int(lower[i + 17:j if j >= 0 else len(lower)].strip())
            if len(self.buf) < end + 4 + length:
                return
            body = self.buf[end + 4:end + 4 + length]
            self.buf = self.buf[end + 4 + length:]
            self._answer(head, body)

    def _answer(self, head: bytes, body: bytes) -> None:
        t = self.transport
        assert t is not None
        st = self.stats
        st.requests += 1
        if head.startswith(b"GET /stats"):
            b = st.body()
            t.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                    b"connection: close\r\n\r\n%s" % (len(b), b))
            t.close()
            self.closed = True
            return
        if not head.startswith(b"POST "):
            t.write(self.answers.not_found)
            return
        m = _MODEL_RE.search(body)
        model = m.group(1) if m else b""
        stream = _STREAM_RE.search(body) is not None
        if model == b"bench-fail":
            st.errors += 1
            self._later(self.answers.error)
            return
        if stream:
            if model == b"bench-cut" or self.delay or self.chunk_delay:
                self.busy = True
                self.stream_task = asyncio.ensure_future(self._stream(cut=model == b"bench-cut"))
                return
            st.streams_started += 1
            st.streams_finished += 1
            t.write(self.answers.sse_whole)
            return
        self._later(self.answers.json)

    def _later(self, data: bytes) -> None:
        if not self.delay:
            assert self.transport is not None
            self.transport.write(data)
            return
        self.busy = True

        def send() -> None:
            self.busy = False
            if not self.closed and self.transport is not None:
                self.transport.write(data)
                self._process()

        asyncio.get_running_loop().call_later(self.delay, send)

    async def _stream(self, cut: bool) -> None:
        st = self.stats
        t = self.transport
        assert t is not None
        st.streams_started += 1
        st.open_streams += 1
        finished = False
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            t.write(self.answers.sse_head)
            for n, ev in enumerate(self.answers.sse_events):
                if cut and n == 3:
                    st.cuts += 1
                    sock = t.get_extra_info("socket")
                    if sock is not None:  # reset, the way a crashing upstream looks
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    t.abort()
                    finished = True
                    return
                if self.closed:
                    return
                t.write(ev)
                if self.chunk_delay:
                    await asyncio.sleep(self.chunk_delay)
            if not self.closed:
                t.write(self.answers.sse_end)
                finished = True
        finally:
            st.open_streams -= 1
            if finished:
                st.streams_finished += 1
            else:
                st.streams_aborted += 1
            self.busy = False
            self.stream_task = None
            if not self.closed and not cut:
                self._process()


async def main_async(args: argparse.Namespace) -> None:
    answers = Answers(args.chunks)
    stats = Stats()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: MockProtocol(answers, stats, args.delay, args.chunk_delay),
                                      args.host, args.port, backlog=1024, reuse_address=True)
    port = server.sockets[0].getsockname()[1]
    print(f"PORT {port}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="fast mock OpenAI-compatible upstream for benchmarks")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--chunks", type=int, default=20, help="chat chunks per stream (default 20)")
    p.add_argument("--delay", type=float, default=0.0, help="seconds before each answer")
    p.add_argument("--chunk-delay", type=float, default=0.0, help="seconds between stream chunks")
    args = p.parse_args(argv)
    try:
        asyncio.run(main_async(args))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
