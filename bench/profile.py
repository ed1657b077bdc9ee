"""Profile the gateway under one benchmark scenario; print the top entries.

``--tool cprofile`` (default) runs the gateway under ``cProfile`` (exact call
counts, slows it down), ``--tool py-spy`` samples it with ``py-spy record``
(no slowdown; needs ``pip install py-spy`` and ptrace rights). Both print the
functions with the most own time and the most cumulative time, which is what
bench/README.md quotes for goals that are not met.

    .venv/bin/python bench/profile.py --scenario c32 --duration 5
"""

from __future__ import annotations

import argparse
import collections
import io
import os
import pstats
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as bench  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenario", default="c32", choices=sorted(bench.SCENARIOS))
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--loop", default="asyncio")
    p.add_argument("--tool", choices=["cprofile", "py-spy"], default="cprofile")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--chunks", type=int, default=20)
    p.add_argument("--keep", help="copy the raw profile here (pstats file, or py-spy collapsed stacks)")
    args = p.parse_args(argv)

    lg = bench.find_loadgen(False, None)
    mock, mock_port = bench.start_mock(args.chunks)
    connections, stream = bench.SCENARIOS[args.scenario]
    try:
        with tempfile.TemporaryDirectory(prefix="at-prof-") as tmp:
            work = Path(tmp)
            port = bench.free_port()
            cfg = work / "gw.yaml"
            cfg.write_text(bench.gateway_config(port, mock_port, args.loop, 1))
            prof = work / "gw.prof"
            if args.tool == "cprofile":
                cmd = [sys.executable, "-m", "cProfile", "-o", str(prof), "-m", "at_gateway", "serve",
                       "--config", str(cfg)]
            else:
                cmd = [sys.executable, "-m", "at_gateway", "serve", "--config", str(cfg)]
            log = open(work / "gw.log", "wb")
            proc = subprocess.Popen(bench.pinned(cmd, "0"), cwd=bench.ROOT, stdout=subprocess.DEVNULL, stderr=log)
            deadline = time.monotonic() + 20
            while True:
                try:
                    if bench.http_get(port, "/health")[0] == 200:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit("profile: the gateway did not start")
                time.sleep(0.01)
            spy = None
            if args.tool == "py-spy":
                # Attached from CPU 1: the sampler does not compete with the gateway for its core.
                spy = subprocess.Popen(bench.pinned(["py-spy", "record", "--format", "raw",
                                                     "-r", "500", "-d", str(int(args.duration) + 1), "-o", str(prof),
                                                     "--pid", str(proc.pid)], "1"),
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(0.5)
            res = lg.run(port, bench.GATEWAY_KEY, "bench", connections, stream, args.duration, args.chunks,
                         bench.DOORS.get(args.scenario, "chat"))
            print(f"{args.scenario}: {res['rps']:.0f} req/s under {args.tool}, p50 {res['p50_us'] / 1000:.2f} ms, "
                  f"bad {res['bad']}")
            if spy is not None:
                spy.wait(60)
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(60)
            log.close()
            if args.keep:
                shutil.copyfile(prof, args.keep)
            if args.tool == "cprofile":
                out = io.StringIO()
                st = pstats.Stats(str(prof), stream=out)
                st.sort_stats("tottime").print_stats(args.top)
                st.sort_stats("cumulative").print_stats(args.top)
                print(out.getvalue())
            else:
                print_raw(prof, args.top)
    finally:
        mock.send_signal(signal.SIGTERM)
        mock.wait(10)
    return 0


def print_raw(path: Path, top: int) -> None:
    """Aggregate py-spy's collapsed stacks into own and cumulative sample counts per function."""
    own: collections.Counter[str] = collections.Counter()
    cum: collections.Counter[str] = collections.Counter()
    groups: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or "concurrent/futures/thread.py" in stack:
            continue  # idle thread-pool workers (getaddrinfo helpers), not the event loop
        count = int(n)
        total += count
        frames = [_strip_line(f) for f in stack.split(";")]
        own[frames[-1]] += count
        groups[_group(frames[-1])] += count
        for f in set(frames):
            cum[f] += count
    print(f"{total} samples of the event-loop thread")
    print("own time by area:")
    for g, n in groups.most_common():
        print(f"  {100 * n / total:5.1f}%  {g}")
    print("own time:")
    for f, n in own.most_common(top):
        print(f"  {100 * n / total:5.1f}%  {f}")
    print("cumulative:")
    for f, n in cum.most_common(top):
        print(f"  {100 * n / total:5.1f}%  {f}")


_GROUPS = [
    ("asyncio/selector_events.py", "asyncio transports (socket reads/writes)"),
    ("selectors.py", "selector (epoll register/unregister/select)"),
    ("asyncio/", "asyncio loop and tasks"),
    ("anyio/", "anyio (cancel scopes, checkpoints, streams, tasks)"),
    ("h11/", "h11"),
    ("logging/", "request log (logging)"),
    ("at_gateway/logs.py", "request log (logging)"),
    ("json/", "json"),
    ("at_gateway/http/framing.py", "our HTTP/1.1 framing"),
    ("at_gateway/", "gateway code (server, app, routing, providers, upstream)"),
    ("contextlib.py", "contextlib (context managers)"),
]


def _group(frame: str) -> str:
    for needle, name in _GROUPS:
        if needle in frame:
            return name
    return "other"


def _strip_line(frame: str) -> str:
    """'func (file.py:123)' -> 'func (file.py)': aggregate per function, not per line."""
    name, sep, rest = frame.partition(" (")
    return name + sep + rest.rsplit(":", 1)[0] + ")" if sep else frame


if __name__ == "__main__":
    sys.exit(main())
