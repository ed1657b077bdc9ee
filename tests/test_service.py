"""The gateway as a process: serve, SIGTERM drain during a stream, SIGHUP reload, logs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import yaml

from tests.conftest import GATEWAY_KEY, base_config
from tests.mock_upstream import MockUpstream, Reply, stream_of, wait_until


@contextmanager
def gateway_process(cfg: dict, tmp_path: Path, extra_env: dict[str, str] | None = None) -> Iterator[tuple]:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = open(tmp_path / "stderr.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "at_gateway", "serve", "--config", str(path), "--port", "0"],
                            stderr=log, env={**os.environ, **(extra_env or {})})
    try:
        port = None

        def ready() -> bool:
            nonlocal port
            for line in (tmp_path / "stderr.log").read_text().splitlines():
                if "listening on" in line:
                    port = int(json.loads(line)["msg"].rsplit(":", 1)[1])
                    return True
            return proc.poll() is not None

        assert wait_until(ready, 15) and port, (tmp_path / "stderr.log").read_text()
        yield proc, f"http://127.0.0.1:{port}", path, tmp_path / "stderr.log"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        log.close()


def test_sigterm_lets_a_stream_finish_then_exits_zero(upstream: MockUpstream, tmp_path: Path) -> None:
    upstream.replies["slow"] = Reply(sse=stream_of(*[f"w{i}" for i in range(10)]), sse_delay=0.05)
    route = [{"name": "r", "steps": [{"provider": "up1", "model": "slow"}]}]
    with gateway_process(base_config(upstream.url, route), tmp_path) as (proc, url, _, logfile):
        with httpx.stream("POST", url + "/v1/chat/completions", headers={"x-api-key": GATEWAY_KEY}, timeout=20,
                          json={"model": "r", "stream": True, "messages": [{"role": "user", "content": "x"}]}) as r:
            it = r.iter_bytes()
            first = next(it)
            assert first.startswith(b"data:")
            proc.send_signal(signal.SIGTERM)
            rest = b"".join(it)
        assert rest.endswith(b"data: [DONE]\n\n")
        assert (first + rest).count(b'"content"') >= 10
        assert proc.wait(15) == 0
        # new connections are refused once draining is done
        try:
            httpx.get(url + "/health", timeout=2)
            raise AssertionError("still serving")
        except httpx.ConnectError:
            pass
        log = logfile.read_text()
        assert "Traceback" not in log
        assert "sk-upstream-secret" not in log and GATEWAY_KEY not in log


def test_sighup_reloads_routes(upstream: MockUpstream, tmp_path: Path) -> None:
    cfg = base_config(upstream.url)
    with gateway_process(cfg, tmp_path) as (proc, url, path, logfile):
        h = {"x-api-key": GATEWAY_KEY}
        assert [m["id"] for m in httpx.get(url + "/v1/models", headers=h).json()["data"]] == ["demo"]
        cfg["routes"].append({"name": "second", "steps": [{"provider": "echo", "model": "e"}]})
        path.write_text(yaml.safe_dump(cfg))
        proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: len(httpx.get(url + "/v1/models", headers=h).json()["data"]) == 2)
        # an invalid config is refused and the running one kept
        path.write_text("api_key: k\nroutes: [{name: x, steps: [{provider: nope, model: m}]}]\n")
        proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: "reload failed" in logfile.read_text())
        assert len(httpx.get(url + "/v1/models", headers=h).json()["data"]) == 2


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    cfg = base_config("http://127.0.0.1:9", port=s.getsockname()[1])
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = subprocess.run([sys.executable, "-m", "at_gateway", "serve", "--config", str(path)], capture_output=True,
                       text=True, timeout=20)
    s.close()
    assert r.returncode == 1
    assert "cannot listen" in r.stderr and "Traceback" not in r.stderr


def test_request_log_line_and_redaction(upstream: MockUpstream, tmp_path: Path) -> None:
    upstream.replies["bad"] = Reply(status=401, body={"error": {"message": "Incorrect API key: sk-upstream-secret-1 "
                                                                           "and Bearer abcdefghijklmnopqrstuvwxyz"}})
    route = [{"name": "r", "steps": [{"provider": "up1", "model": "bad"}, {"provider": "echo", "model": "e"}]}]
    with gateway_process(base_config(upstream.url, route), tmp_path) as (proc, url, _, logfile):
        r = httpx.post(url + "/v1/chat/completions", headers={"x-api-key": GATEWAY_KEY, "x-request-id": "rid-1"},
                       json={"model": "r", "messages": [{"role": "user", "content": "top secret words"}]})
        assert r.status_code == 200
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        text = logfile.read_text()
        assert "sk-upstream-secret-1" not in text and "abcdefghijklmnopqrstuvwxyz" not in text
        assert "top secret words" not in text  # no message content unless log_bodies
        line = next(json.loads(ln) for ln in text.splitlines() if '"rid-1"' in ln)
        assert line["status"] == 200 and line["route"] == "r" and line["provider"] == "echo"
        assert line["attempts"] == 2 and line["tokens"]["total_tokens"] > 0
        assert "latency_ms" in line and "ttfb_ms" in line and line["level"] == "info"
        assert "[REDACTED]" in json.dumps(line["failed_attempts"])


def test_bad_tls_files_fail_at_once_even_with_workers(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("not a certificate")
    cfg = base_config("http://127.0.0.1:9", port=0, workers=2,
                      tls={"cert_file": str(tmp_path / "cert.pem"), "key_file": str(tmp_path / "missing.pem")})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = subprocess.run([sys.executable, "-m", "at_gateway", "serve", "--config", str(path)], capture_output=True,
                       text=True, timeout=20)
    assert r.returncode == 1
    assert "tls: cannot load certificate or key" in r.stderr and str(path) in r.stderr
    assert "Traceback" not in r.stderr


def test_sighup_reload_redacts_the_new_keys_in_logs(upstream: MockUpstream, tmp_path: Path) -> None:
    """Redaction by value follows a reload: a key added by SIGHUP never reaches the log either."""
    cfg = base_config(upstream.url, log_bodies=True)
    with gateway_process(cfg, tmp_path) as (proc, url, path, logfile):
        new_key = "reloadedPlainKey77"
        cfg["providers"].append({"name": "added", "type": "openai", "base_url": upstream.url, "api_key": new_key})
        cfg["routes"].append({"name": "second", "steps": [{"provider": "added", "model": "m"}]})
        cfg["max_body_size"] = "1MiB"  # a server setting: kept, and the reload says so
        path.write_text(yaml.safe_dump(cfg))
        proc.send_signal(signal.SIGHUP)
        h = {"x-api-key": GATEWAY_KEY}
        assert wait_until(lambda: len(httpx.get(url + "/v1/models", headers=h).json()["data"]) == 2)
        r = httpx.post(url + "/v1/chat/completions", headers={**h, "x-request-id": "rid-k"},
                       json={"model": "demo", "messages": [{"role": "user", "content": f"my key is {new_key}"}]})
        assert r.status_code == 200
        assert wait_until(lambda: '"rid-k"' in logfile.read_text())
        line = next(ln for ln in logfile.read_text().splitlines() if '"rid-k"' in ln)
        assert new_key not in line and "my key is [REDACTED]" in line
        assert "changes to max_body_size need a restart" in logfile.read_text()


def test_a_stop_signal_sent_twice_at_once_is_one_stop_and_the_drain_completes(
        upstream: MockUpstream, tmp_path: Path) -> None:
    # `make run` relays SIGTERM to its child, and a process-group kill reaches both: the gateway sees it twice
    # within moments. That is one stop: the request in flight still gets its whole answer.
    upstream.replies["slow"] = Reply(sse=stream_of(*[f"w{i}" for i in range(10)]), sse_delay=0.05)
    route = [{"name": "r", "steps": [{"provider": "up1", "model": "slow"}]}]
    with gateway_process(base_config(upstream.url, route), tmp_path) as (proc, url, _, logfile):
        with httpx.stream("POST", url + "/v1/chat/completions", headers={"x-api-key": GATEWAY_KEY}, timeout=20,
                          json={"model": "r", "stream": True, "messages": [{"role": "user", "content": "x"}]}) as r:
            it = r.iter_bytes()
            first = next(it)
            proc.send_signal(signal.SIGTERM)
            proc.send_signal(signal.SIGTERM)
            rest = b"".join(it)
        assert (first + rest).endswith(b"data: [DONE]\n\n")
        assert proc.wait(15) == 0
        text = logfile.read_text()
        # (the kernel may merge the two into one pending signal; either way, one stop)
        assert "stopping the requests still running" not in text


def test_stop_signals_count_an_echo_once_and_a_later_repeat_twice() -> None:
    from at_gateway.signals import ECHO_WINDOW, StopSignals

    now = [100.0]
    stops = StopSignals(clock=lambda: now[0])
    table = [  # (signal, seconds since the one before, counted, stops so far)
        (signal.SIGTERM, 0.0, True, 1),
        (signal.SIGTERM, 0.01, False, 1),  # make's relay of the same stop
        (signal.SIGINT, 0.01, True, 2),  # another signal is another stop
        (signal.SIGINT, ECHO_WINDOW + 0.1, True, 3),  # a person's second Ctrl-C, later
    ]
    for signum, after, counted, total in table:
        now[0] += after
        assert stops.add(signum) is counted and stops.count == total, (signum, after)
