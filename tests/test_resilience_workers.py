"""Issue 11 across processes: ``workers: 2`` gateways started as ``serve`` starts them.

A key cooled by a 429 in one worker is skipped by the other (the cooldowns live in shared memory made
before the fork), and a change of the config file is picked up by every worker within 2 s while a stream
that started before it finishes on the config it started with; an invalid file is logged and the running
config kept.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import GATEWAY_KEY, base_config
from tests.mock_upstream import MockUpstream, Received, Reply, chat_completion, stream_of, wait_until
from tests.test_resilience_routing import KEYS, err, key_of, keyed, seen
from tests.test_service import gateway_process
from tests.test_workers import children, listening_lines

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs /proc to see the workers")

CHAT = "/v1/chat/completions"


def post(url: str, model: str) -> httpx.Response:
    """A chat on a new connection (the kernel may hand each one to either worker)."""
    return httpx.post(url + CHAT, headers={"x-api-key": GATEWAY_KEY}, timeout=15,
                      json={"model": model, "messages": [{"role": "user", "content": "hi"}]})


def _socket_inodes(pid: int) -> set[str]:
    out = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().name if hasattr(fd, "readlink") else str(Path.readlink(fd))
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(target[len("socket:["):-1])
    return out


def tcp_sockets() -> list[tuple[int, int, str, str]]:
    """The machine's TCP sockets from /proc/net/tcp(6): (local port, remote port, state, inode)."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            out.append((int(f[1].rsplit(":", 1)[1], 16), int(f[2].rsplit(":", 1)[1], 16), f[3], f[9]))
    return out


def _established_to(port: int) -> set[str]:
    """Inodes of the machine's established TCP connections to 127.0.0.1:``port``."""
    return {inode for _, remote, state, inode in tcp_sockets() if remote == port and state == "01"}


def workers_connected(supervisor: int, port: int) -> int:
    """How many workers hold a connection to the upstream on ``port``: each has its own pool, so a worker
    that served a request keeps one (idle) afterwards."""
    conns = _established_to(port)
    return sum(1 for pid in children(supervisor) if _socket_inodes(pid) & conns)


@contextmanager
def two_workers(cfg: dict[str, Any], tmp_path: Path) -> Iterator[tuple[Any, str, Path, Path]]:
    with gateway_process({**cfg, "workers": 2}, tmp_path) as (proc, url, path, logfile):
        assert wait_until(lambda: listening_lines(logfile) == 2 and len(children(proc.pid)) == 2, 15), \
            logfile.read_text()
        yield proc, url, path, logfile


def test_a_key_cooled_by_a_429_in_one_worker_is_skipped_by_the_other(upstream: MockUpstream,
                                                                    tmp_path: Path) -> None:
    def answer(rec: Received) -> Reply:
        if key_of(rec) == 0:
            return Reply(429, err(429, "slow down"), headers={"retry-after": "60"})
        return Reply(body=chat_completion("key 1"))

    upstream.replies["m"] = answer
    cfg = base_config(upstream.url, [{"name": "r", "steps": [
        {"provider": "p", "model": "m", "retries": 1, "retry_backoff": "0.01s"}]}])
    cfg["providers"] = [keyed("p", upstream.url, 2)]
    with two_workers(cfg, tmp_path) as (proc, url, _, logfile):
        first = post(url, "r")
        assert first.status_code == 200 and first.headers["x-gateway-attempts"] == "2"
        assert seen(upstream, "m") == [0, 1]
        # Each worker picks key 0 first (its own round-robin counters): the other one must find it cooling.
        sent = 0
        while workers_connected(proc.pid, upstream.port) < 2 and sent < 200:
            r = post(url, "r")
            assert r.status_code == 200 and r.headers["x-gateway-attempts"] == "1", r.text
            sent += 1
        assert workers_connected(proc.pid, upstream.port) == 2, "the requests all went to one worker"
        for _ in range(10):
            assert post(url, "r").status_code == 200
        assert seen(upstream, "m").count(0) == 1, seen(upstream, "m")
        assert not any(k in logfile.read_text() for k in KEYS)


def write(path: Path, cfg: dict[str, Any]) -> None:
    """Replace the file as an editor saving it would (a new inode, so the change is seen at once)."""
    tmp = path.with_suffix(".new")
    tmp.write_text(yaml.safe_dump(cfg))
    tmp.replace(path)


def test_a_config_file_change_is_applied_while_a_stream_finishes_on_the_old_one(upstream: MockUpstream,
                                                                               tmp_path: Path) -> None:
    release = threading.Event()
    upstream.replies["slow"] = Reply(sse=stream_of("old", " config", " stream"), hold=release, hold_after=2)
    upstream.replies["fresh-model"] = Reply(body=chat_completion("from the new route"))
    old_routes = [{"name": "r", "steps": [{"provider": "up1", "model": "slow"}]}]
    cfg = base_config(upstream.url, old_routes)
    body: list[bytes] = []
    first = threading.Event()

    def stream(url: str) -> None:
        with httpx.stream("POST", url + CHAT, headers={"x-api-key": GATEWAY_KEY}, timeout=30,
                          json={"model": "r", "stream": True, "messages": [{"role": "user", "content": "x"}]}) as r:
            got = b""
            for part in r.iter_bytes():
                got += part
                first.set()
            body.append(got)

    with two_workers(cfg, tmp_path) as (proc, url, path, logfile):
        assert post(url, "fresh").status_code == 404
        t = threading.Thread(target=stream, args=(url,))
        t.start()
        try:
            assert first.wait(10)
            new_routes = [{"name": "r", "steps": [{"provider": "up1", "model": "fresh-model"}]},
                          {"name": "fresh", "steps": [{"provider": "up1", "model": "fresh-model"}]}]
            changed = time.monotonic()
            write(path, base_config(upstream.url, new_routes))
            # every worker reloads within 2 s: then any new connection finds the new route
            assert wait_until(lambda: logfile.read_text().count("config reloaded") == 2, 2.5), logfile.read_text()
            assert time.monotonic() - changed < 2.5
            assert all(post(url, "fresh").status_code == 200 for _ in range(10))
            assert not body  # the stream is still held, on the old config
        finally:
            release.set()
            t.join(20)
        assert body and body[0].endswith(b"data: [DONE]\n\n")
        assert b'" stream"' in body[0]  # all of the old route's answer
        assert post(url, "r").json()["choices"][0]["message"]["content"] == "from the new route"

        # an invalid file: logged with its problem, by each worker; the running config kept
        broken = base_config(upstream.url, [{"name": "fresh", "steps": [{"provider": "nope", "model": "x"}]}])
        write(path, broken)
        assert wait_until(lambda: logfile.read_text().count("reload failed, keeping the running config") == 2, 2.5)
        problems = [ln for ln in logfile.read_text().splitlines() if "reload failed" in ln]
        assert all("unknown provider 'nope'" in ln for ln in problems), problems
        assert all(post(url, "fresh").status_code == 200 for _ in range(10))
        assert "Traceback" not in logfile.read_text()
