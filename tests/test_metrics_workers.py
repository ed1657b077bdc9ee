"""``workers: 2``: one scrape answers the sum over both workers, whichever answers it, and a worker that dies
takes none of the counts with it.

A real subprocess gateway; which worker holds a connection is read from the kernel (the accepted socket's inode
in /proc/net/tcp, found among each worker's file descriptors), so the requests are known to be spread over both
pids and each worker is scraped on a connection it holds. Every wait is on a condition."""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import GATEWAY_KEY, base_config
from tests.mock_upstream import MockUpstream, Reply, stream_of, wait_until
from tests.test_resilience_workers import tcp_sockets
from tests.test_service import gateway_process
from tests.test_workers import children, listening_lines

pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs /proc to see which worker serves")

CHAT = json.dumps({"model": "demo", "messages": [{"role": "user", "content": "sum me"}]})


def server_inodes(port: int, client_port: int) -> set[str]:
    """The inodes of the gateway's end of the connection from ``client_port``."""
    return {inode for local, remote, _, inode in tcp_sockets() if local == port and remote == client_port}


def worker_of(conn: http.client.HTTPConnection, port: int, pids: set[int]) -> int | None:
    inodes = {f"socket:[{i}]" for i in server_inodes(port, conn.sock.getsockname()[1])}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    return pid
            except OSError:
                continue
    return None


def call(conn: http.client.HTTPConnection, method: str, path: str, body: str | None = None) -> tuple[int, str]:
    headers = {"x-api-key": GATEWAY_KEY, "content-type": "application/json"} if body else {}
    conn.request(method, path, body=body, headers=headers)
    r = conn.getresponse()
    return r.status, r.read().decode()


def figures(conn: http.client.HTTPConnection) -> dict[str, float]:
    status, text = call(conn, "GET", "/metrics")
    assert status == 200, text
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def test_one_scrape_sums_every_worker_whichever_answers(upstream: MockUpstream, tmp_path: Path) -> None:
    release = threading.Event()
    upstream.replies["held"] = Reply(sse=stream_of("a", "b"), hold=release, hold_after=1)
    routes = [{"name": "demo", "steps": [{"provider": "echo", "model": "echo-1"}]},
              {"name": "held", "steps": [{"provider": "up1", "model": "held"}]}]
    cfg = base_config(upstream.url, routes, workers=2, metrics={"enabled": True})
    with gateway_process(cfg, tmp_path) as (proc, url, _, logfile):
        assert wait_until(lambda: listening_lines(logfile) == 2 and len(children(proc.pid)) == 2, 15)
        pids = children(proc.pid)
        port = int(url.rsplit(":", 1)[1])
        made = 0
        held: dict[int, http.client.HTTPConnection] = {}  # a keep-alive connection to each worker
        others: list[http.client.HTTPConnection] = []
        for _ in range(200):  # new connections until each worker holds one (the kernel spreads them)
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            assert call(conn, "POST", "/v1/chat/completions", CHAT)[0] == 200
            made += 1
            pid = worker_of(conn, port, pids)
            assert pid in pids
            if pid in held:
                others.append(conn)
            else:
                held[pid] = conn
            if len(held) == 2:
                break
        assert len(held) == 2
        first, second = sorted(held)
        for pid, n in ((first, 3), (second, 5)):  # unequal shares: a scrape of one worker alone is never right
            for _ in range(n):
                assert call(held[pid], "POST", "/v1/chat/completions", CHAT)[0] == 200
            made += n
        for pid in (first, second):  # each worker, scraped on its own connection, answers the sum of both
            assert wait_until(lambda p=pid: figures(held[p]).get("atg_requests_total") == made, 5), figures(held[pid])
            got = figures(held[pid])
            assert got["atg_workers"] == 2
            assert got["atg_attempts_total"] == made

        # a stream held open on whichever worker takes it is in flight for a scrape of either
        results: list[int] = []

        def stream() -> None:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            body = json.dumps({"model": "held", "stream": True, "messages": [{"role": "user", "content": "x"}]})
            status, text = call(c, "POST", "/v1/chat/completions", body)
            results.append(status if text.endswith("data: [DONE]\n\n") else -1)
            c.close()

        t = threading.Thread(target=stream)
        t.start()
        try:
            for pid in (first, second):
                assert wait_until(lambda p=pid: figures(held[p]).get("atg_requests_in_flight") == 1, 5)
        finally:
            release.set()
            t.join(10)
        assert results == [200]
        made += 1
        for pid in (first, second):
            assert wait_until(lambda p=pid: figures(held[p]).get("atg_requests_in_flight") == 0
                              and figures(held[p]).get("atg_requests_total") == made, 5)

        # a worker killed: its counts stay in the sum (kept in its slot, then taken over by its replacement)
        cpu = figures(held[first])["process_cpu_seconds_total"]
        os.kill(second, signal.SIGKILL)
        assert wait_until(lambda: figures(held[first]).get("atg_workers") == 1
                          or len(children(proc.pid) - {second}) == 2, 10)
        assert figures(held[first])["atg_requests_total"] == made
        assert wait_until(lambda: len(children(proc.pid) - {second}) == 2 and listening_lines(logfile) == 3, 15)
        assert wait_until(lambda: figures(held[first]).get("atg_workers") == 2, 5)
        got = figures(held[first])
        assert got["atg_requests_total"] == made and got["atg_attempts_total"] == made
        assert got["process_cpu_seconds_total"] >= cpu  # a counter: a death never makes it drop (a "reset")
        for conn in [*held.values(), *others]:
            conn.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert "Traceback" not in logfile.read_text()
