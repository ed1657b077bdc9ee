"""The soak: steady mixed load for a long time; fails on memory growth or any wrong answer.

Runs the gateway (production defaults: auth, routing, request log, usage
accounting) in front of the bench mock, and sends a steady rate of requests
(default 100/s for 10 minutes) mixing:

* plain and streamed chat completions (must be 200, well-formed, streams end with [DONE]);
* clients that disconnect after the first stream chunk (the upstream request must be
  cancelled: the mock must see the stream aborted, and no stream may stay open);
* a route whose first step fails (upstream 500) and falls back to the second (200, 2 attempts);
* a route whose only step fails (must be 502 ``all_steps_failed``);
* streams the upstream resets after three chunks (200, then an SSE error event and no [DONE]).

Every ``--interval`` seconds (30) it prints the gateway's RSS, open file
descriptors and the mock's open streams. At the end it fails (exit 1) if any
request went wrong, if the RSS kept growing (last third of the samples above
the first third by more than ``--max-growth-mib``), if descriptors leaked, if
upstream streams stayed open, or if the gateway logged an error.

    .venv/bin/python bench/soak.py --duration 600      # make soak
    .venv/bin/python bench/soak.py --duration 60 --interval 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as bench  # noqa: E402
from loadgen import HTTPConn  # noqa: E402

SOAK_ROUTES = """
  - name: fallback
    steps:
      - provider: mock
        model: bench-fail
      - provider: mock
        model: bench-model
  - name: broken
    steps:
      - provider: mock
        model: bench-fail
  - name: cut
    steps:
      - provider: mock
        model: bench-cut
"""

# kind -> weight (out of 100)
MIX = {"json": 35, "stream": 25, "disconnect": 10, "fallback": 10, "fallback_stream": 5, "broken": 10, "cut": 5}


def body(model: str, stream: bool) -> bytes:
    return bench.request_body(model, stream).encode()


class Soak:
    def __init__(self, port: int, chunks: int, max_in_flight: int) -> None:
        self.port = port
        self.chunks = chunks
        self.free: list[HTTPConn] = []
        self.counts: Counter[str] = Counter()
        self.errors: list[str] = []
        self.in_flight = 0
        self.max_in_flight = max_in_flight
        self.problems: list[str] = []
        self.headers = {"Content-Type": "application/json", "X-Api-Key": bench.GATEWAY_KEY}

    def _conn(self) -> HTTPConn:
        return self.free.pop() if self.free else HTTPConn("127.0.0.1", self.port)

    def _fail(self, kind: str, why: str) -> None:
        self.counts["errors"] += 1
        if len(self.errors) < 20:
            self.errors.append(f"{kind}: {why}")

    async def one(self, kind: str) -> None:
        self.in_flight += 1
        conn = self._conn()
        keep = True
        try:
            model = {"json": "bench", "stream": "bench", "disconnect": "bench", "fallback": "fallback",
                     "fallback_stream": "fallback", "broken": "broken", "cut": "cut"}[kind]
            stream = kind in ("stream", "disconnect", "fallback_stream", "cut")
            status, headers, data = await asyncio.wait_for(
                conn.request("POST", "/v1/chat/completions", self.headers, body(model, stream),
                             first_chunk_only=kind == "disconnect"), 30)
            if kind == "disconnect":
                keep = False
                if status != 200 or not data.startswith(b"data: "):
                    self._fail(kind, f"{status} {data[:120]!r}")
            elif kind in ("json", "fallback"):
                if status != 200 or b'"chat.completion"' not in data or b'"total_tokens"' not in data:
                    self._fail(kind, f"{status} {data[:120]!r}")
                elif kind == "fallback" and headers.get("x-gateway-attempts") != "2":
                    self._fail(kind, f"attempts {headers.get('x-gateway-attempts')}")
            elif kind in ("stream", "fallback_stream"):
                if (status != 200 or not data.endswith(b"data: [DONE]\n\n")
                        or data.count(b"chat.completion.chunk") < self.chunks):
                    self._fail(kind, f"{status} {data[-120:]!r}")
            elif kind == "broken":
                if status != 502 or b"all_steps_failed" not in data:
                    self._fail(kind, f"{status} {data[:120]!r}")
            elif kind == "cut":
                if status != 200 or b"[DONE]" in data or b"stream_interrupted" not in data:
                    self._fail(kind, f"{status} {data[-160:]!r}")
            self.counts[kind] += 1
        except (OSError, ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError) as exc:
            keep = False
            self._fail(kind, f"{exc.__class__.__name__}: {exc}")
        finally:
            self.in_flight -= 1
            if keep and conn.writer is not None:
                self.free.append(conn)
            else:
                conn.close()

    async def load(self, rate: float, duration: float, sample: Callable[[float], None], interval: float) -> None:
        kinds = [k for k, w in MIX.items() for _ in range(w)]
        rnd = random.Random(5)
        tasks: set[asyncio.Task[None]] = set()
        start = time.monotonic()
        next_sample = start + interval
        n = 0
        while True:
            now = time.monotonic()
            if now - start >= duration:
                break
            if now >= next_sample:
                sample(now - start)
                next_sample += interval
            due = start + n / rate
            if due > now:
                await asyncio.sleep(min(due - now, next_sample - now))
                continue
            n += 1
            if self.in_flight >= self.max_in_flight:
                self._fail("overload", f"{self.in_flight} requests in flight: the gateway is not keeping up")
                continue
            t = asyncio.ensure_future(self.one(rnd.choice(kinds)))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks, timeout=60)
        sample(time.monotonic() - start)
        for c in self.free:
            c.close()


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def mock_stats(port: int) -> dict[str, int]:
    _, data = bench.http_get(port, "/stats")
    return json.loads(data)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="steady mixed load; fails on memory growth or any wrong answer")
    p.add_argument("--duration", type=float, default=float(os.environ.get("SOAK_DURATION", 600)),
                   help="seconds of load (default 600, env SOAK_DURATION)")
    p.add_argument("--interval", type=float, default=30.0, help="seconds between RSS samples (default 30)")
    p.add_argument("--rate", type=float, default=100.0, help="requests per second (default 100)")
    p.add_argument("--chunks", type=int, default=20)
    p.add_argument("--chunk-delay", type=float, default=0.005,
                   help="seconds between stream chunks at the mock (streams last chunks x this)")
    p.add_argument("--max-growth-mib", type=float, default=8.0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--loop", default="auto")
    args = p.parse_args(argv)
    interval = min(args.interval, max(args.duration / 3, 1.0))

    mock, mock_port = bench.start_mock(args.chunks, chunk_delay=args.chunk_delay)
    try:
        with tempfile.TemporaryDirectory(prefix="at-soak-") as tmp:
            work = Path(tmp)
            port = bench.free_port()
            cfg = work / "soak.yaml"
            cfg.write_text(bench.gateway_config(port, mock_port, args.loop, args.workers) + SOAK_ROUTES)
            gw = bench.start_gateway_from(cfg, port, work / "soak.log", args.workers,
                                          "0" if args.workers == 1 else None)
            try:
                code, st, log, samples, soak = run_soak(args, gw, mock_port, interval)
            finally:
                if gw.proc.poll() is None:
                    gw.proc.kill()
                    gw.proc.wait()
    finally:
        mock.send_signal(signal.SIGTERM)
        try:
            mock.wait(10)
        except Exception:
            mock.kill()
    return verdict(args, code, st, log, samples, soak)


def run_soak(args: argparse.Namespace, gw: bench.Gateway, mock_port: int,
             interval: float) -> tuple[int, dict[str, int], str, list[tuple[float, float]], Soak]:
    """The load and the samples; returns what the verdict needs (the gateway is stopped here)."""
    print(f"soak: {args.duration:g}s at {args.rate:g} req/s, sample every {interval:g}s; "
          f"mix {MIX}", flush=True)
    fds0 = fd_count(gw.proc.pid)
    samples: list[tuple[float, float]] = []

    def sample(t: float) -> None:
        rss = gw.rss_mib()
        samples.append((t, rss))
        st = mock_stats(mock_port)
        print(f"  t={t:6.0f}s  requests={sum(v for k, v in soak.counts.items() if k != 'errors'):7d}  "
              f"errors={soak.counts['errors']:3d}  rss={rss:6.1f} MiB  fds={fd_count(gw.proc.pid):4d}  "
              f"in_flight={soak.in_flight:3d}  upstream_open_streams={st['open_streams']}", flush=True)

    soak = Soak(gw.port, args.chunks, max_in_flight=max(64, int(args.rate * 2)))
    sample(0.0)
    asyncio.run(soak.load(args.rate, args.duration, sample, interval))
    # Let cancelled upstream streams settle, then look at everything.
    deadline = time.monotonic() + 10
    st = mock_stats(mock_port)
    while st["open_streams"] and time.monotonic() < deadline:
        time.sleep(0.05)
        st = mock_stats(mock_port)
    fds1 = fd_count(gw.proc.pid)
    code = gw.stop()
    log = gw.log_path.read_text()
    if fds0 > 0 and fds1 > fds0 + 8:
        soak.problems.append(f"file descriptors grew from {fds0} to {fds1}")
    return code, st, log, samples, soak


def verdict(args: argparse.Namespace, code: int, st: dict[str, int], log: str, samples: list[tuple[float, float]],
            soak: Soak) -> int:
    ok = True
    print(f"done: {dict(soak.counts)}")
    print(f"mock: {st}")
    problems = list(soak.problems)
    if soak.counts["errors"]:
        problems.append(f"{soak.counts['errors']} request(s) went wrong, e.g. {soak.errors[:5]}")
    if st["open_streams"]:
        problems.append(f"{st['open_streams']} upstream stream(s) still open after the load")
    if soak.counts["disconnect"] and st["streams_aborted"] < 0.9 * soak.counts["disconnect"]:
        problems.append(f"client disconnects did not cancel upstream streams: {soak.counts['disconnect']} "
                        f"disconnects, {st['streams_aborted']} upstream streams aborted")
    rss = [r for _, r in samples[1:]] or [r for _, r in samples]
    third = max(1, len(rss) // 3)
    first, last = statistics.median(rss[:third]), max(rss[-third:])
    growth = last - first
    print(f"RSS MiB over time: {[round(r, 1) for _, r in samples]}; growth {growth:+.1f} MiB "
          f"(allowed {args.max_growth_mib:g})")
    if len(rss) >= 3 and growth > args.max_growth_mib:
        problems.append(f"RSS kept growing: {first:.1f} -> {last:.1f} MiB")
    if code != 0:
        problems.append(f"gateway exited with {code} on SIGTERM")
    bad_lines = [line for line in log.splitlines() if '"level":"error"' in line or "Traceback" in line]
    if bad_lines:
        problems.append(f"{len(bad_lines)} error line(s) in the gateway log, e.g. {bad_lines[0][:300]}")
    if problems:
        for pr in problems:
            print(f"soak: FAILED: {pr}")
        ok = False
    else:
        print("soak: OK")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
