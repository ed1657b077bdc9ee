"""A small asyncio HTTP/1.1 load generator: the fallback when ``wrk`` is missing, and the soak's client.

It is much slower than wrk (one Python process, sharing CPU 1 with the mock),
so figures taken with it understate what the gateway can do; the runner says
so in its output when it had to fall back to it.

Every response is checked like ``check.lua`` does: status 200, and for
streams a body ending in ``data: [DONE]`` with at least N chunks.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass, field


class HTTPConn:
    """One keep-alive client connection: request, then read the whole answer (or only its start)."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def request(self, method: str, path: str, headers: dict[str, str], body: bytes = b"",
                      first_chunk_only: bool = False) -> tuple[int, dict[str, str], bytes]:
        """Send one request and read its answer; ``first_chunk_only`` stops after the first body bytes
        and closes the connection (a client that goes away mid-stream)."""
        if self.writer is None:
            await self.connect()
        assert self.reader is not None and self.writer is not None
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        head += f"Content-Length: {len(body)}\r\n\r\n"
        self.writer.write(head.encode() + body)
        r = self.reader
        status_line = await r.readline()
        if not status_line:
            raise ConnectionError("connection closed before the status line")
        status = int(status_line.split()[1])
        resp_headers: dict[str, str] = {}
        while True:
            line = await r.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            k, _, v = line.decode("latin-1").partition(":")
            resp_headers[k.strip().lower()] = v.strip()
        if resp_headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size_line = await r.readline()
                if not size_line:
                    raise ConnectionError("connection closed inside a chunked body")
                size = int(size_line.split(b";")[0], 16)
                if size == 0:
                    await r.readline()
                    break
                parts.append(await r.readexactly(size))
                await r.readexactly(2)
                if first_chunk_only:
                    self.close()
                    return status, resp_headers, b"".join(parts)
            data = b"".join(parts)
        else:
            n = int(resp_headers.get("content-length", "0"))
            data = await r.readexactly(n) if n else b""
        if resp_headers.get("connection", "").lower() == "close":
            self.close()
        return status, resp_headers, data


MESSAGE_STOP = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'


def check_body(status: int, body: bytes, stream: bool, chunks: int, fmt: str = "chat") -> bool:
    """Whether an answer is right: ``fmt`` "messages" for the Anthropic Messages door, else chat completions."""
    if status != 200:
        return False
    if fmt == "messages":
        if stream:
            return body.endswith(MESSAGE_STOP) and body.count(b"content_block_delta") >= chunks
        return b'"type":"message"' in body and b'"output_tokens"' in body
    if stream:
        return body.endswith(b"data: [DONE]\n\n") and body.count(b"chat.completion.chunk") >= chunks
    return b'"chat.completion"' in body and b'"total_tokens"' in body


@dataclass
class Result:
    requests: int = 0
    ok: int = 0
    bad: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    first_bad: str = ""


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return 0.0
    i = min(len(sorted_values) - 1, max(0, int(round(p / 100 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[i]


async def _worker(host: str, port: int, path: str, headers: dict[str, str], body: bytes, stream: bool, chunks: int,
                  record_from: float, end: float, res: Result, fmt: str = "chat") -> None:
    conn = HTTPConn(host, port)
    now = time.perf_counter
    while True:
        t0 = now()
        if t0 >= end:
            break
        try:
            status, _, data = await conn.request("POST", path, headers, body)
            good = check_body(status, data, stream, chunks, fmt)
        except (OSError, ConnectionError, asyncio.IncompleteReadError, ValueError) as exc:
            conn.close()
            good, status, data = False, 0, str(exc).encode()
            if t0 >= record_from:
                res.errors += 1
        t1 = now()
        if t0 < record_from or t1 > end:
            continue
        res.requests += 1
        res.latencies.append(t1 - t0)
        if good:
            res.ok += 1
        else:
            res.bad += 1
            if not res.first_bad:
                res.first_bad = f"{status} {data[:200]!r}"
    conn.close()


async def run_load(host: str, port: int, path: str, headers: dict[str, str], body: bytes, *, connections: int,
                   duration: float, warmup: float = 0.0, stream: bool = False, chunks: int = 20,
                   fmt: str = "chat") -> dict[str, object]:
    """Run ``connections`` closed-loop clients for warmup + duration; report like check.lua's BENCHJSON."""
    res = Result()
    start = time.perf_counter()
    record_from = start + warmup
    end = record_from + duration
    await asyncio.gather(*(_worker(host, port, path, headers, body, stream, chunks, record_from, end, res, fmt)
                           for _ in range(connections)))
    lat = sorted(res.latencies)
    us = 1e6
    return {
        "requests": res.requests, "duration_us": int(duration * us), "ok": res.ok, "bad": res.bad,
        "connect_errors": 0, "read_errors": res.errors, "write_errors": 0, "status_errors": 0, "timeouts": 0,
        "p50_us": int(percentile(lat, 50) * us), "p90_us": int(percentile(lat, 90) * us),
        "p99_us": int(percentile(lat, 99) * us), "max_us": int((lat[-1] if lat else 0) * us),
        "mean_us": (sum(lat) / len(lat) * us) if lat else 0.0, "first_bad": res.first_bad,
    }


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="small Python load generator (wrk fallback)")
    p.add_argument("url", help="http://host:port/path")
    p.add_argument("-c", "--connections", type=int, default=1)
    p.add_argument("-d", "--duration", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=0.0)
    p.add_argument("--body", default='{"model":"bench-model","messages":[{"role":"user","content":"hi"}]}')
    p.add_argument("--key", default="")
    p.add_argument("--stream", action="store_true")
    p.add_argument("--chunks", type=int, default=20)
    p.add_argument("--format", default="chat", choices=("chat", "messages"))
    args = p.parse_args(argv)
    rest = args.url.split("://", 1)[1]
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.partition(":")
    headers = {"Content-Type": "application/json"}
    if args.key:
        headers["X-Api-Key"] = args.key
    out = asyncio.run(run_load(host, int(port or 80), "/" + path, headers, args.body.encode(),
                               connections=args.connections, duration=args.duration, warmup=args.warmup,
                               stream=args.stream, chunks=args.chunks, fmt=args.format))
    print("BENCHJSON " + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
