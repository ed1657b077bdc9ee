"""``workers: N``: several processes on one port, supervised (restart, drain, reload, give up)."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import httpx
import pytest

from tests.conftest import GATEWAY_KEY, base_config
from tests.mock_upstream import MockUpstream, Reply, stream_of, wait_until
from tests.test_service import gateway_process

CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hello workers"}]}


def children(pid: int) -> set[int]:
    try:
        return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    except OSError:
        return set()


def listening_lines(logfile: Path) -> int:
    return logfile.read_text().count("listening on")


def chat_ok(url: str) -> bool:
    # a new connection each time, so the kernel may hand it to either worker
    r = httpx.post(url + "/v1/chat/completions", headers={"x-api-key": GATEWAY_KEY}, json=CHAT, timeout=10)
    return r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "hello workers"


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs /proc to see the workers")
@pytest.mark.parametrize("mode", ["reuseport", "shared"])
def test_workers_serve_one_port_and_a_dead_worker_is_replaced(upstream: MockUpstream, tmp_path: Path,
                                                             mode: str) -> None:
    cfg = base_config(upstream.url, workers=2)
    env = {"AT_GATEWAY_WORKER_SOCKET": mode}
    with gateway_process(cfg, tmp_path, env) as (proc, url, _, logfile):
        assert wait_until(lambda: listening_lines(logfile) == 2 and len(children(proc.pid)) == 2, 15)
        assert all(chat_ok(url) for _ in range(20))
        first = children(proc.pid)
        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        assert wait_until(lambda: len(children(proc.pid)) == 2 and victim not in children(proc.pid), 10)
        assert wait_until(lambda: listening_lines(logfile) == 3, 10), logfile.read_text()
        assert all(chat_ok(url) for _ in range(20))
        workers = children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert not any(Path(f"/proc/{p}").exists() and "zombie" not in Path(f"/proc/{p}/status").read_text()
                       for p in workers)
        log = logfile.read_text()
        assert "starting a new one" in log and "Traceback" not in log


def test_sigterm_drains_every_worker(upstream: MockUpstream, tmp_path: Path) -> None:
    upstream.replies["slow"] = Reply(sse=stream_of(*[f"w{i}" for i in range(8)]), sse_delay=0.05)
    route = [{"name": "r", "steps": [{"provider": "up1", "model": "slow"}]}]
    cfg = base_config(upstream.url, route, workers=2)
    with gateway_process(cfg, tmp_path) as (proc, url, _, logfile):
        assert wait_until(lambda: listening_lines(logfile) == 2, 15)
        bodies: list[bytes] = []
        started = threading.Event()

        def stream() -> None:
            with httpx.stream("POST", url + "/v1/chat/completions", headers={"x-api-key": GATEWAY_KEY}, timeout=20,
                              json={"model": "r", "stream": True,
                                    "messages": [{"role": "user", "content": "x"}]}) as r:
                it = r.iter_bytes()
                got = next(it)
                started.set()
                bodies.append(got + b"".join(it))

        threads = [threading.Thread(target=stream) for _ in range(4)]
        for t in threads:
            t.start()
        assert started.wait(10)
        assert wait_until(lambda: len(upstream.received) >= 4, 10)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(20)
        assert len(bodies) == 4 and all(b.endswith(b"data: [DONE]\n\n") for b in bodies)
        assert proc.wait(15) == 0
        assert "draining 2 worker(s)" in logfile.read_text()


def test_sighup_reaches_every_worker(upstream: MockUpstream, tmp_path: Path) -> None:
    cfg = base_config(upstream.url, workers=2)
    with gateway_process(cfg, tmp_path) as (proc, url, path, logfile):
        assert wait_until(lambda: listening_lines(logfile) == 2, 15)
        proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: logfile.read_text().count("config reloaded") == 2, 10), logfile.read_text()
        assert chat_ok(url)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0


def test_a_port_in_use_fails_before_any_worker_starts(upstream: MockUpstream, tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys

    import yaml

    holder = socket.socket()  # the port is taken (without SO_REUSEPORT): the supervisor can't reserve it
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    cfg = base_config(upstream.url, workers=2, port=holder.getsockname()[1])
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    try:
        out = subprocess.run([sys.executable, "-m", "at_gateway", "serve", "--config", str(path)],
                             capture_output=True, text=True, timeout=30)
    finally:
        holder.close()
    assert out.returncode == 1
    assert "cannot listen" in out.stderr and "Traceback" not in out.stderr


def test_supervisor_gives_up_when_workers_keep_dying(tmp_path: Path) -> None:
    """The crash-loop guard, with workers that exit 1 at once (a subprocess runs the supervisor)."""
    import subprocess
    import sys

    code = (
        "import logging, sys\n"
        "from at_gateway.config import build_config\n"
        "from at_gateway.workers import supervise\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "cfg = build_config({'api_key': 'k', 'port': 0, 'workers': 2}, 'test')\n"
        "sys.exit(supervise(cfg, lambda config, sock: 1))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "giving up" in out.stderr and "Traceback" not in out.stderr
