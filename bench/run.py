"""The benchmark: what the gateway adds to every request, measured against the upstream itself.

One invocation starts the fast mock upstream and runs the load generator
against it **directly**, then starts the gateway and runs the same load
**through it**, so both sides are measured on the same machine in the same
minute. Pinning (``taskset``): the gateway gets CPU 0 to itself; the mock
and the load generator share CPU 1. The gateway runs with the production
defaults on: auth, a route to an ``openai``-type provider (the mock), one
JSON request-log line per request (to a file) and usage accounting.

Scenarios, each after a warm-up: ``c1`` (one connection, non-streaming),
``c32`` (32 connections), ``s32`` (32 connections, streaming N chunks), ``m32``
(``s32`` through the Anthropic Messages door, ``/v1/messages``, translated). The
gateway is measured once per event loop (``asyncio``; ``uvloop`` too when it
is importable), and ``c32`` once more with ``workers: 2`` (unpinned: its two
workers share both cores with the mock and the load generator).

``--pyz FILE`` (``make bench`` builds and passes ``dist/at-gateway.pyz``) adds
the rows of what users deploy: the one-file build under a stock interpreter
(``--pyz-python``, default ``/usr/bin/python3``) with ``-I -S``, no
site-packages, ``loop: auto``, pinned like the others; its event loop is the
one its start-up line names (uvloop from its embedded wheels where one fits).
The .pyz is started once before it is measured, so that its one-time wheel
extraction is not in the ``ready`` figure (it is printed separately).

Load generator: ``wrk`` with ``check.lua``, which checks every response
(status and body). When wrk is missing we try ``apt-get install wrk`` and
otherwise fall back to ``loadgen.py`` (much slower; the output says so).

Output: a table on stdout, and JSON under ``bench/results/`` (git-ignored).
Exit status 1 when any response was wrong (speed goals missed only print).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
GATEWAY_KEY = "bench-gateway-key-0123456789"
UPSTREAM_KEY = "sk-bench-upstream-0123456789"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

SCENARIOS = {
    # name: (connections, stream)
    "c1": (1, False),
    "c32": (32, False),
    "s32": (32, True),
    "m32": (32, True),  # s32 through the Anthropic Messages door (/v1/messages), translated to the openai mock
}
# Scenarios that come in by another door than chat completions: their path and request format.
DOORS = {"m32": "messages"}
DOOR_PATHS = {"chat": "/v1/chat/completions", "messages": "/v1/messages"}

GOALS = {
    "added_p50_c1_ms": 0.25,
    "c32_rps": 5000,
    "c32_p99_ms": 10.0,
    "s32_streams_per_s": 3000,
    "rss_mib": 40,
    "ready_s": 0.3,
    "pyz_c32_vs_venv_asyncio": 1.12,  # issue 14: the deployed artefact carries uvloop's speed-up
    "m32_vs_s32": 0.75,  # issue 12: a /v1/messages stream within 25 % of a chat stream
}


def request_body(model: str, stream: bool, door: str = "chat") -> str:
    if door == "messages":  # the same request in Anthropic's form
        return json.dumps({"model": model, "max_tokens": 32, "temperature": 0, "stream": stream,
                           "system": "You are a terse assistant.",
                           "messages": [{"role": "user", "content": "Say hello to the benchmark."}]},
                          separators=(",", ":"))
    body: dict[str, Any] = {"model": model, "messages": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Say hello to the benchmark."}], "max_tokens": 32, "temperature": 0}
    if stream:
        body["stream"] = True
    return json.dumps(body, separators=(",", ":"))


# -- processes -----------------------------------------------------------------
def have_taskset() -> bool:
    return shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2


def pinned(cmd: list[str], cpus: str | None) -> list[str]:
    if cpus is None or not have_taskset():
        return cmd
    return ["taskset", "-c", cpus, *cmd]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(port: int, path: str, timeout: float = 1.0) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def start_mock(chunks: int, delay: float = 0.0, chunk_delay: float = 0.0,
               cpus: str | None = "1") -> tuple[subprocess.Popen[str], int]:
    cmd = pinned([sys.executable, str(HERE / "mock_upstream.py"), "--chunks", str(chunks), "--delay", str(delay),
                  "--chunk-delay", str(chunk_delay)], cpus)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("PORT "):
        proc.kill()
        raise SystemExit(f"bench: the mock upstream did not start ({line!r})")
    return proc, int(line.split()[1])


def gateway_config(port: int, mock_port: int, loop: str, workers: int, log_level: str = "info",
                   store: Path | None = None, metrics: bool = False) -> str:
    # A store file in the run's directory: the request log and usage accounting on, as deployed.
    return f"""# written by bench/run.py
api_key: {GATEWAY_KEY}
metrics: {{enabled: {"true" if metrics else "false"}}}
store: {{path: "{store if store is not None else ':memory:'}"}}
host: 127.0.0.1
port: {port}
log_level: {log_level}
loop: {loop}
workers: {workers}
providers:
  - name: mock
    type: openai
    base_url: http://127.0.0.1:{mock_port}/v1
    api_key: {UPSTREAM_KEY}
routes:
  - name: bench
    steps:
      - provider: mock
        model: bench-model
"""


@dataclass
class Gateway:
    proc: subprocess.Popen[bytes]
    port: int
    ready_s: float
    log_path: Path
    workers: int

    def pids(self) -> list[int]:
        """The gateway process and, with workers, its children."""
        out = [self.proc.pid]
        try:
            kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
            out += [int(k) for k in kids]
        except OSError:
            pass
        return out

    def cpu_seconds(self) -> float:
        total = 0.0
        for pid in self.pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime
        return total

    def rss_mib(self) -> float:
        total = 0
        for pid in self.pids():
            try:
                total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
            except OSError:
                continue
        return total / 2**20

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def start_gateway(workdir: Path, mock_port: int, loop: str, workers: int, cpus: str | None,
                  log_level: str = "info", name: str = "gateway", metrics: bool = False) -> Gateway:
    port = free_port()
    cfg = workdir / f"{name}.yaml"
    cfg.write_text(gateway_config(port, mock_port, loop, workers, log_level, store=workdir / f"{name}.db",
                                  metrics=metrics))
    return start_gateway_from(cfg, port, workdir / f"{name}.log", workers, cpus)


def create_client_key(cfg: Path, **limits: int) -> str:
    """A client key in the gateway's store, made with the CLI as an operator would (issue 9's bench rows)."""
    opts = [x for k, v in limits.items() for x in (f"--{k}", str(v))]
    out = subprocess.run([sys.executable, "-m", "at_gateway", "keys", "create", "--name", "bench", *opts,
                          "--json", "--config", str(cfg)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise SystemExit(f"bench: keys create failed: {out.stderr.strip()[-500:]}")
    key = json.loads(out.stdout).get("key")
    if not isinstance(key, str) or not key.startswith("atg_"):
        raise SystemExit(f"bench: keys create printed no key: {out.stdout[:200]!r}")
    return key


def start_gateway_from(cfg: Path, port: int, log_path: Path, workers: int, cpus: str | None,
                       cmd: list[str] | None = None, env: dict[str, str] | None = None) -> Gateway:
    """Start ``python -m at_gateway serve`` (or ``cmd``) and time it until /health answers (the "ready" figure)."""
    cmd = cmd or [sys.executable, "-m", "at_gateway", "serve"]
    with open(log_path, "wb") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(pinned([*cmd, "--config", str(cfg)], cpus), cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=log, env=dict(os.environ) if env is None else env)
    deadline = t0 + 20
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"bench: the gateway exited with {proc.returncode}; see {log_path}:\n"
                             + log_path.read_text()[-2000:])
        try:
            status, _ = http_get(port, "/health", timeout=0.5)
            if status == 200:
                break
        except OSError:
            pass
        if time.perf_counter() > deadline:
            proc.kill()
            raise SystemExit("bench: the gateway did not become ready within 20 s")
        time.sleep(0.002)
    ready = time.perf_counter() - t0
    return Gateway(proc, port, ready, log_path, workers)


def start_pyz(workdir: Path, mock_port: int, pyz: Path, python: str, cpus: str | None,
              name: str = "pyz") -> Gateway:
    """The .pyz as users run it: ``python3 -I -S at-gateway.pyz serve``, ``loop: auto``, a clean environment."""
    port = free_port()
    cfg = workdir / f"{name}.yaml"
    cfg.write_text(gateway_config(port, mock_port, "auto", 1, store=workdir / f"{name}.db"))
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "AT_GATEWAY_CACHE": str(workdir / "pyz-cache")}
    return start_gateway_from(cfg, port, workdir / f"{name}.log", 1, cpus,
                              cmd=[python, "-I", "-S", str(pyz), "serve"], env=env)


def loop_in_use(log_path: Path) -> tuple[str, str]:
    """(loop, start-up line) from a gateway's log: what it actually runs on, not what was asked."""
    for line in log_path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        text = str(record.get("msg", record.get("message", "")))
        if text.startswith("event loop:"):
            return text.split()[2].rstrip(";"), text
    return "?", "no 'event loop:' line in the log"


def python_version(python: str) -> str | None:
    out = subprocess.run([python, "-I", "-S", "-c", "import platform; print(platform.python_version())"],
                         capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


# -- load ------------------------------------------------------------------------
@dataclass
class LoadGen:
    kind: str  # "wrk" or "python"
    note: str = ""

    def run(self, port: int, key: str, model: str, connections: int, stream: bool, duration: float,
            chunks: int, door: str = "chat") -> dict[str, Any]:
        url = f"http://127.0.0.1:{port}{DOOR_PATHS[door]}"
        body = request_body(model, stream, door)
        if self.kind == "wrk":
            env = {**os.environ, "BENCH_BODY": body, "BENCH_KEY": key, "BENCH_STREAM": "1" if stream else "0",
                   "BENCH_CHUNKS": str(chunks), "BENCH_FORMAT": door}
            secs = max(1, round(duration))  # wrk takes whole seconds
            cmd = pinned(["wrk", "-t1", f"-c{connections}", f"-d{secs}s", "--timeout", "10s",
                          "-s", str(HERE / "check.lua"), url], "1")
        else:
            env = dict(os.environ)
            cmd = pinned([sys.executable, str(HERE / "loadgen.py"), url, "-c", str(connections), "-d", str(duration),
                          "--body", body, "--key", key, "--chunks", str(chunks), "--format", door]
                         + (["--stream"] if stream else []),
                         "1")
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=duration + 120)
        for line in out.stdout.splitlines():
            if line.startswith("BENCHJSON "):
                r: dict[str, Any] = json.loads(line[len("BENCHJSON "):])
                r["rps"] = r["requests"] / (r["duration_us"] / 1e6) if r["duration_us"] else 0.0
                return r
        raise SystemExit(f"bench: {self.kind} printed no result:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")


def find_loadgen(allow_install: bool, forced: str | None) -> LoadGen:
    if forced == "python":
        return LoadGen("python", "load generator: bench/loadgen.py (asked for); figures understate the gateway")
    if shutil.which("wrk"):
        return LoadGen("wrk")
    if allow_install and shutil.which("apt-get") and os.geteuid() == 0:
        print("bench: wrk not found; installing it with apt-get ...", flush=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        if not shutil.which("wrk"):
            subprocess.run(["apt-get", "update", "-qq"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        if shutil.which("wrk"):
            return LoadGen("wrk")
    if forced == "wrk":
        raise SystemExit("bench: wrk asked for but not available")
    return LoadGen("python", "wrk is not installed and could not be installed: using bench/loadgen.py, "
                             "a much slower Python load generator; the figures understate the gateway")


# -- the run -------------------------------------------------------------------------
@dataclass
class Row:
    scenario: str
    target: str  # "direct", "gateway" (the venv) or "pyz" (the one-file build under a stock python3 -I -S)
    loop: str = ""
    workers: int = 1
    result: dict[str, Any] = field(default_factory=dict)
    cpu_us_per_req: float | None = None
    rss_mib: float | None = None
    ready_s: float | None = None
    python: str = ""  # the interpreter's version, for the .pyz rows
    keyed: bool = False  # called with a client key from the store, limited (rpm + tpm), instead of a YAML key
    metrics: bool = False  # metrics.enabled: true (issue 13: c32 within 5 % of metrics off)

    @property
    def label(self) -> str:
        if self.target == "direct":
            return "direct"
        if self.target == "pyz":
            return f"pyz {self.loop} py{self.python}"
        return (f"gateway {self.loop}" + (f" workers={self.workers}" if self.workers > 1 else "")
                + (" db-key rpm+tpm" if self.keyed else "") + (" metrics on" if self.metrics else ""))


def measure(lg: LoadGen, gw: Gateway | None, port: int, scenario: str, args: argparse.Namespace,
            row: Row, key: str | None = None) -> Row:
    connections, stream = SCENARIOS[scenario]
    door = DOORS.get(scenario, "chat")
    key = key or (GATEWAY_KEY if gw is not None else "")
    model = "bench" if gw is not None else "bench-model"
    if args.warmup > 0:
        lg.run(port, key, model, connections, stream, args.warmup, args.chunks, door)
    cpu0 = gw.cpu_seconds() if gw else 0.0
    res = lg.run(port, key, model, connections, stream, args.duration, args.chunks, door)
    row.result = res
    if gw is not None:
        used = gw.cpu_seconds() - cpu0
        row.cpu_us_per_req = used * 1e6 / res["requests"] if res["requests"] else None
        row.rss_mib = gw.rss_mib()
        row.ready_s = gw.ready_s
    bad = res["bad"] + res["connect_errors"] + res["read_errors"] + res["write_errors"] + res["timeouts"]
    print(f"  {scenario:4s} {row.label:28s} {res['rps']:9.0f} req/s  p50 {res['p50_us'] / 1000:6.3f} ms  "
          f"p99 {res['p99_us'] / 1000:6.3f} ms" + (f"  BAD {bad}: {res['first_bad']}" if bad else ""), flush=True)
    return row


def uvloop_importable() -> bool:
    out = subprocess.run([sys.executable, "-c", "import uvloop"], capture_output=True)
    return out.returncode == 0


def machine_info() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cpus": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version(), "host": platform.node()}


def fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(rows: list[Row]) -> str:
    direct = {r.scenario: r for r in rows if r.target == "direct"}
    head = (f"{'scenario':8s} {'target':26s} {'req/s':>9s} {'p50 ms':>8s} {'p99 ms':>8s} {'cpu us/req':>10s} "
            f"{'RSS MiB':>8s} {'ready s':>7s} {'rps gw/dir':>10s} {'p50 gw/dir':>10s} {'+p50 ms':>8s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        res = r.result
        d = direct.get(r.scenario)
        ratio_rps = ratio_p50 = added = None
        if r.target != "direct" and d is not None:
            ratio_rps = res["rps"] / d.result["rps"] if d.result["rps"] else None
            ratio_p50 = res["p50_us"] / d.result["p50_us"] if d.result["p50_us"] else None
            added = (res["p50_us"] - d.result["p50_us"]) / 1000
        lines.append(
            f"{r.scenario:8s} {r.label:26s} {res['rps']:9.0f} {res['p50_us'] / 1000:8.3f} {res['p99_us'] / 1000:8.3f} "
            f"{fmt(r.cpu_us_per_req, '10.0f')} {fmt(r.rss_mib, '8.1f')} {fmt(r.ready_s, '7.3f')} "
            f"{fmt(ratio_rps, '10.3f')} {fmt(ratio_p50, '10.2f')} {fmt(added, '8.3f')}")
    return "\n".join(lines)


def goals(rows: list[Row], loop: str, target: str = "gateway") -> list[tuple[str, bool, str]]:
    direct = {r.scenario: r for r in rows if r.target == "direct"}
    gw = {r.scenario: r for r in rows if r.target == target and r.loop == loop and r.workers == 1 and not r.keyed
          and not r.metrics}
    out: list[tuple[str, bool, str]] = []
    if "c1" in gw and "c1" in direct:
        added = (gw["c1"].result["p50_us"] - direct["c1"].result["p50_us"]) / 1000
        out.append(("added p50 at c1 <= 0.25 ms", added <= GOALS["added_p50_c1_ms"], f"{added:.3f} ms"))
    if "c32" in gw:
        r = gw["c32"].result
        out.append((">= 5000 req/s at c32", r["rps"] >= GOALS["c32_rps"], f"{r['rps']:.0f} req/s"))
        out.append(("p99 <= 10 ms at c32", r["p99_us"] / 1000 <= GOALS["c32_p99_ms"], f"{r['p99_us'] / 1000:.2f} ms"))
    if "s32" in gw:
        r = gw["s32"].result
        out.append((">= 3000 streams/s at s32", r["rps"] >= GOALS["s32_streams_per_s"], f"{r['rps']:.0f} streams/s"))
    if "m32" in gw and "s32" in gw and gw["s32"].result["rps"]:
        ratio = gw["m32"].result["rps"] / gw["s32"].result["rps"]
        want = GOALS["m32_vs_s32"]
        out.append((f"m32 (/v1/messages) streams/s >= {want:.2f}x s32", ratio >= want, f"{ratio:.3f}x"))
    if gw:
        rss = max(r.rss_mib or 0 for r in gw.values())
        out.append(("RSS after load <= 40 MiB", rss <= GOALS["rss_mib"], f"{rss:.1f} MiB"))
        ready = next(iter(gw.values())).ready_s or 0
        out.append(("ready <= 0.3 s after start", ready <= GOALS["ready_s"], f"{ready:.3f} s"))
    venv = next((r for r in rows if r.target == "gateway" and r.loop == "asyncio" and r.workers == 1
                 and r.scenario == "c32"), None)
    if target == "pyz" and "c32" in gw and venv is not None and venv.result["rps"]:
        ratio = gw["c32"].result["rps"] / venv.result["rps"]
        want = GOALS["pyz_c32_vs_venv_asyncio"]
        out.append((f"c32 req/s >= {want:.2f}x the venv's asyncio row", ratio >= want, f"{ratio:.3f}x"))
    return out


def keyed_goals(rows: list[Row], loop: str) -> list[tuple[str, bool, str]]:
    """Issue 9: a limited client key from the store costs at most 10 % of req/s (c32, s32) and 0.05 ms at c1."""
    plain = {r.scenario: r for r in rows if r.target == "gateway" and r.loop == loop and r.workers == 1
             and not r.keyed and not r.metrics}
    keyed = {r.scenario: r for r in rows if r.keyed and r.loop == loop}
    out: list[tuple[str, bool, str]] = []
    for s in ("c32", "s32"):
        if s in plain and s in keyed and plain[s].result["rps"]:
            ratio = keyed[s].result["rps"] / plain[s].result["rps"]
            out.append((f"{s}: db key req/s >= 0.90x the YAML key's", ratio >= 0.90, f"{ratio:.3f}x"))
    if "c1" in plain and "c1" in keyed:
        grew = (keyed["c1"].result["p50_us"] - plain["c1"].result["p50_us"]) / 1000
        out.append(("c1: p50 grows <= 0.05 ms with a db key", grew <= 0.05, f"{grew:+.3f} ms"))
    return out


def metrics_goals(rows: list[Row], loop: str) -> list[tuple[str, bool, str]]:
    """Issue 13: with metrics on, c32 req/s within 5 % of metrics off."""
    plain = next((r for r in rows if r.target == "gateway" and r.loop == loop and r.workers == 1 and not r.keyed
                  and not r.metrics and r.scenario == "c32"), None)
    on = next((r for r in rows if r.metrics and r.loop == loop and r.scenario == "c32"), None)
    if plain is None or on is None or not plain.result["rps"]:
        return []
    ratio = on.result["rps"] / plain.result["rps"]
    return [("c32: metrics on req/s >= 0.95x metrics off", ratio >= 0.95, f"{ratio:.3f}x")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="gateway vs direct benchmark")
    p.add_argument("--duration", type=float, default=float(os.environ.get("BENCH_DURATION", 10)),
                   help="measured seconds per run (default 10, env BENCH_DURATION)")
    p.add_argument("--warmup", type=float, default=float(os.environ.get("BENCH_WARMUP", 2)),
                   help="warm-up seconds before each run (default 2)")
    p.add_argument("--chunks", type=int, default=20, help="chunks per stream (default 20)")
    p.add_argument("--scenarios", default="c1,c32,s32,m32")
    p.add_argument("--loops", default=os.environ.get("BENCH_LOOPS", "asyncio,uvloop"),
                   help="event loops to measure the gateway with (uvloop skipped when not importable)")
    p.add_argument("--no-workers", action="store_true", help="skip the workers=2 row")
    p.add_argument("--no-keyed", action="store_true", help="skip the rows with a limited client key from the store")
    p.add_argument("--no-metrics", action="store_true", help="skip the c32 row with metrics on")
    p.add_argument("--pyz", type=Path, default=os.environ.get("BENCH_PYZ") or None,
                   help="also measure this .pyz under --pyz-python -I -S (make bench: dist/at-gateway.pyz)")
    p.add_argument("--pyz-python", default=os.environ.get("BENCH_PYZ_PYTHON") or (
        "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else "python3"),
        help="the stock interpreter to run the .pyz with (default /usr/bin/python3, else python3 on PATH)")
    p.add_argument("--loadgen", choices=["wrk", "python"], default=None)
    p.add_argument("--no-install", action="store_true", help="do not try to apt-get install wrk")
    p.add_argument("--out", default=None, help="JSON result file (default bench/results/<time>.json)")
    args = p.parse_args(argv)

    scenarios = [s for s in args.scenarios.split(",") if s]
    for s in scenarios:
        if s not in SCENARIOS:
            p.error(f"unknown scenario {s!r}")
    lg = find_loadgen(not args.no_install, args.loadgen)
    loops = [x for x in args.loops.split(",") if x]
    notes: list[str] = []
    if lg.note:
        notes.append(lg.note)
    if "uvloop" in loops and not uvloop_importable():
        loops.remove("uvloop")
        notes.append("uvloop is not importable: only asyncio measured (pip install uvloop, or '.[uvloop]')")
    if not have_taskset():
        notes.append("taskset missing or fewer than 2 CPUs: processes are NOT pinned")
    pyz_version = None
    if args.pyz is not None:
        if not args.pyz.is_file():
            p.error(f"--pyz {args.pyz}: no such file (make pyz builds it)")
        pyz_version = python_version(args.pyz_python)
        if pyz_version is None:
            p.error(f"--pyz-python {args.pyz_python}: cannot run it")
        notes.append(f"the .pyz rows: {args.pyz_python} (Python {pyz_version}) -I -S {args.pyz}; the venv rows: "
                     f"{os.path.realpath(sys.executable)} (Python {platform.python_version()})")
    for n in notes:
        print(f"bench: NOTE: {n}", flush=True)
    print(f"bench: load generator {lg.kind}; {args.duration:g}s per run after {args.warmup:g}s warm-up; "
          f"gateway on CPU 0, mock and load generator on CPU 1", flush=True)

    rows: list[Row] = []
    exits: dict[str, int] = {}
    log_lines: dict[str, int] = {}
    mock, mock_port = start_mock(args.chunks)
    try:
        with tempfile.TemporaryDirectory(prefix="at-bench-") as tmp:
            workdir = Path(tmp)
            print("direct (load generator -> mock):", flush=True)
            for s in scenarios:
                if s not in DOORS:  # the mock speaks chat completions only: a door scenario has no direct row
                    rows.append(measure(lg, None, mock_port, s, args, Row(s, "direct")))
            for loop in loops:
                print(f"gateway, loop {loop} (load generator -> gateway -> mock):", flush=True)
                gw = start_gateway(workdir, mock_port, loop, 1, "0", name=f"gw-{loop}")
                try:
                    for s in scenarios:
                        rows.append(measure(lg, gw, gw.port, s, args, Row(s, "gateway", loop)))
                finally:
                    exits[loop] = gw.stop()
                    log_lines[loop] = sum(1 for line in gw.log_path.read_text().splitlines()
                                          if '"msg":"request"' in line)
            if not args.no_keyed:
                loop = loops[0]
                print(f"gateway, loop {loop}, a client key from the store with rpm and tpm limits:", flush=True)
                gw = start_gateway(workdir, mock_port, loop, 1, "0", name=f"gw-{loop}-keyed")
                try:
                    # Limits far above what the run reaches: every request pays for the checks, none is refused.
                    key = create_client_key(workdir / f"gw-{loop}-keyed.yaml", rpm=10**9, tpm=10**12)
                    for s in scenarios:
                        rows.append(measure(lg, gw, gw.port, s, args, Row(s, "gateway", loop, keyed=True), key=key))
                finally:
                    exits["keyed"] = gw.stop()
                    log_lines["keyed"] = sum(1 for line in gw.log_path.read_text().splitlines()
                                             if '"msg":"request"' in line)
            if not args.no_metrics and "c32" in scenarios:
                loop = loops[0]
                print(f"gateway, loop {loop}, metrics on:", flush=True)
                gw = start_gateway(workdir, mock_port, loop, 1, "0", name=f"gw-{loop}-metrics", metrics=True)
                try:
                    rows.append(measure(lg, gw, gw.port, "c32", args, Row("c32", "gateway", loop, metrics=True)))
                finally:
                    exits["metrics"] = gw.stop()
                    log_lines["metrics"] = sum(1 for line in gw.log_path.read_text().splitlines()
                                               if '"msg":"request"' in line)
            if args.pyz is not None:
                # once unmeasured: the first start extracts the embedded wheels into the cache
                first = start_pyz(workdir, mock_port, args.pyz, args.pyz_python, "0", name="pyz-first")
                first.stop()
                notes.append(f"the .pyz's first start (extracting its wheels) was ready in {first.ready_s:.3f} s; "
                             f"it said: {loop_in_use(first.log_path)[1]}")
                gw = start_pyz(workdir, mock_port, args.pyz, args.pyz_python, "0")
                pyz_loop, _ = loop_in_use(gw.log_path)
                print(f"the .pyz, loop auto -> {pyz_loop} (load generator -> pyz gateway -> mock):", flush=True)
                try:
                    for s in scenarios:
                        rows.append(measure(lg, gw, gw.port, s, args,
                                            Row(s, "pyz", pyz_loop, python=pyz_version or "")))
                finally:
                    exits["pyz"] = gw.stop()
                    log_lines["pyz"] = sum(1 for line in gw.log_path.read_text().splitlines()
                                           if '"msg":"request"' in line)
            if not args.no_workers and "c32" in scenarios and (os.cpu_count() or 1) >= 2:
                loop = loops[0]
                print(f"gateway, loop {loop}, workers=2 (unpinned):", flush=True)
                gw = start_gateway(workdir, mock_port, loop, 2, None, name="gw-workers2")
                try:
                    rows.append(measure(lg, gw, gw.port, "c32", args, Row("c32", "gateway", loop, workers=2)))
                finally:
                    exits["workers2"] = gw.stop()
                    log_lines["workers2"] = sum(1 for line in gw.log_path.read_text().splitlines()
                                                if '"msg":"request"' in line)
    finally:
        mock.send_signal(signal.SIGTERM)
        try:
            mock.wait(10)
        except subprocess.TimeoutExpired:
            mock.kill()

    print()
    print(table(rows))
    print()
    ok = True
    for loop in loops:
        print(f"goals ({loop}, one pinned core):")
        for name, met, value in goals(rows, loop):
            print(f"  [{'met' if met else 'MISSED'}] {name}: {value}")
    pyz_loops = sorted({r.loop for r in rows if r.target == "pyz"})
    for loop in pyz_loops:
        print(f"goals (the .pyz on {loop}, one pinned core):")
        for name, met, value in goals(rows, loop, "pyz"):
            print(f"  [{'met' if met else 'MISSED'}] {name}: {value}")
    for loop in sorted({r.loop for r in rows if r.keyed}):
        print(f"goals (a limited client key from the store vs the YAML key, {loop}, one pinned core):")
        for name, met, value in keyed_goals(rows, loop):
            print(f"  [{'met' if met else 'MISSED'}] {name}: {value}")
    for loop in sorted({r.loop for r in rows if r.metrics}):
        print(f"goals (metrics on vs off, {loop}, one pinned core):")
        for name, met, value in metrics_goals(rows, loop):
            print(f"  [{'met' if met else 'MISSED'}] {name}: {value}")
    wrong = sum(r.result["bad"] + r.result["connect_errors"] + r.result["read_errors"] + r.result["write_errors"]
                + r.result["timeouts"] for r in rows)
    if wrong:
        ok = False
        print(f"bench: FAILED: {wrong} response(s) were wrong or failed")
    for name, code in exits.items():
        if code != 0:
            ok = False
            print(f"bench: FAILED: gateway ({name}) exited with {code} on SIGTERM")
    print(f"request-log lines written: {log_lines}")
    for n in notes:
        print(f"NOTE: {n}")

    result = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(), "loadgen": lg.kind, "notes": notes,
        "settings": {"duration_s": args.duration, "warmup_s": args.warmup, "chunks": args.chunks,
                     "pinning": "gateway CPU 0; mock + load generator CPU 1" if have_taskset() else "none"},
        "rows": [{"scenario": r.scenario, "target": r.target, "loop": r.loop, "workers": r.workers, "keyed": r.keyed,
                  "metrics": r.metrics,
                  "python": r.python or platform.python_version(),
                  "cpu_us_per_req": r.cpu_us_per_req, "rss_mib": r.rss_mib, "ready_s": r.ready_s, **r.result}
                 for r in rows],
        "goals": {loop: [{"goal": n, "met": m, "value": v} for n, m, v in goals(rows, loop)] for loop in loops},
        "pyz_goals": {loop: [{"goal": n, "met": m, "value": v} for n, m, v in goals(rows, loop, "pyz")]
                      for loop in pyz_loops},
        "keyed_goals": {loop: [{"goal": n, "met": m, "value": v} for n, m, v in keyed_goals(rows, loop)]
                        for loop in sorted({r.loop for r in rows if r.keyed})},
        "metrics_goals": {loop: [{"goal": n, "met": m, "value": v} for n, m, v in metrics_goals(rows, loop)]
                          for loop in sorted({r.loop for r in rows if r.metrics})},
        "gateway_exit_codes": exits, "request_log_lines": log_lines, "ok": ok,
    }
    RESULTS.mkdir(exist_ok=True)
    out = Path(args.out) if args.out else RESULTS / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "latest.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
