"""Secrets in upstream text: redacted whole, and only then shortened, wherever upstream bytes are quoted.

A cut made before redaction can split a configured key so that redaction by value no longer finds it,
and its start leaks. Keys without a recognisable shape (Azure's 32 hex digits, a short Gemini key, a
plain configured key) are the ones only redaction by value catches, so each is planted across every
cut boundary of every path that quotes an upstream's bytes, and no start of it may reach the client
or the log.
"""

from __future__ import annotations

import json
import re
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from at_gateway.logs import Redactor, quote
from tests.conftest import GATEWAY_KEY, run_gateway
from tests.mock_upstream import MockUpstream, Reply

AZURE_KEY = "7d1f0b9e4a2c8365e0b7d4f19a6c2e58"  # Azure's shape: 32 hex digits, nothing to recognise
GEMINI_KEY = "AIzaQ7vK2mP9wT"  # too short for the AIza… pattern: only its value gives it away
PLAIN_KEY = "zq8Wt3vLm1RkHb"  # a configured key of no known shape
KEYS = {"azure": AZURE_KEY, "gemini": GEMINI_KEY, "plain": PLAIN_KEY}
MIN_PREFIX = 4  # no start of a key this long (or longer) may appear
FILL = "x"


def leaked(text: str, key: str) -> str | None:
    for n in range(len(key), MIN_PREFIX - 1, -1):
        if key[:n] in text:
            return key[:n]
    return None


# -- the helper itself ----------------------------------------------------------------------------

@pytest.mark.parametrize("key", sorted(KEYS.values()))
@pytest.mark.parametrize("as_bytes", [False, True])
def test_quote_redacts_the_whole_text_before_it_cuts(key: str, as_bytes: bool) -> None:
    redact = Redactor([key])
    limit = 50
    for offset in range(0, 400):
        text = FILL * offset + key + FILL * 20_000  # long enough that quote() redacts a window, not all
        out = quote(redact, text.encode() if as_bytes else text, limit)
        assert leaked(out, key) is None, (offset, out)
        assert len(out) == limit and out.endswith("…")


def test_quote_keeps_a_cut_key_out_of_reach_even_when_redaction_shrinks_the_text() -> None:
    """A long token redacted to ten characters pulls what followed it towards the cut: wherever quote()
    stops redacting, a key split there must not come within the part it shows."""
    redact = Redactor([AZURE_KEY])
    limit = 40
    for gap in range(8, 1200):
        # the token is redacted to 11 characters with its space, the filler then brings the key up to the cut
        for pad in range(0, limit + 2, 3):
            text = "sk-" + "a" * gap + " " + FILL * pad + AZURE_KEY + " tail " + FILL * gap
            out = quote(redact, text, limit)
            assert leaked(out, AZURE_KEY) is None, (gap, pad, out)
            assert out.startswith("[REDACTED] " + FILL * min(pad, limit - 12)), (gap, pad, out)


def test_quote_short_text_is_redacted_and_not_cut() -> None:
    redact = Redactor([PLAIN_KEY])
    assert quote(redact, f"key {PLAIN_KEY} refused", 300) == "key [REDACTED] refused"
    assert quote(redact, b"\xff" + PLAIN_KEY.encode(), 300) == "\ufffd[REDACTED]"
    assert quote(redact, "a" * 10, 4) == "aaa…" and quote(redact, "a" * 4, 4) == "aaaa"


# -- every path that quotes an upstream's bytes -------------------------------------------------

@dataclass
class Case:
    route: str
    stream: bool
    reply: Callable[[str], Reply]  # the upstream text (filler and key) -> what the upstream answers


def _sse_raw(data: str) -> list[Any]:
    return [f"data: {data}\n\n".encode()]


CASES: dict[str, Case] = {
    # openai-compatible (through Azure's adapter, which reuses it) and openai itself
    "openai 2xx body not JSON": Case("az", False, lambda t: Reply(body=t)),
    "openai 2xx error message": Case("az", False, lambda t: Reply(body={"error": {"message": t}})),
    "openai stream event not JSON": Case("az", True, lambda t: Reply(sse=_sse_raw(t))),
    "openai stream answered with a non-JSON body": Case("oa", True, lambda t: Reply(body=t)),
    "openai error body not JSON": Case("oa", False, lambda t: Reply(status=500, body=t)),
    "openai error body JSON": Case("oa", False, lambda t: Reply(status=500, body={"error": {"message": t}})),
    # anthropic
    "anthropic error body not JSON": Case("an", False, lambda t: Reply(status=500, body=t)),
    "anthropic 2xx body not JSON": Case("an", False, lambda t: Reply(body=t)),
    "anthropic stream event not JSON": Case("an", True, lambda t: Reply(sse=[f"event: message_start\ndata: {t}\n\n"
                                                                             .encode()])),
    "anthropic error event without a message": Case("an", True, lambda t: Reply(sse=[
        ("event: error\ndata: " + json.dumps({"type": "error", "error": {"detail": t}}) + "\n\n").encode()])),
    # gemini
    "gemini error body not JSON": Case("ge", False, lambda t: Reply(status=500, body=t)),
    "gemini 2xx body not JSON": Case("ge", False, lambda t: Reply(body=t)),
    "gemini stream event not JSON": Case("ge", True, lambda t: Reply(sse=_sse_raw(t))),
    "gemini finishMessage": Case("ge", False, lambda t: Reply(body={"candidates": [
        {"index": 0, "finishReason": "OTHER", "finishMessage": t}]})),
}


_NO_RESILIENCE = {"cooldown": "off", "breaker": "off"}


def _config(url: str) -> dict[str, Any]:
    steps = {"oa": "plain-up", "az": "azure-up", "an": "anthropic-up", "ge": "gemini-up"}
    return {
        "api_key": GATEWAY_KEY, "port": 0,
        "providers": [
            # Every request fails on purpose: keys that rested or circuits that opened would stop asking upstream.
            {"name": "plain-up", "type": "openai", "base_url": url, "api_key": PLAIN_KEY, **_NO_RESILIENCE},
            {"name": "azure-up", "type": "azure", "base_url": url, "api_key": AZURE_KEY, **_NO_RESILIENCE},
            {"name": "anthropic-up", "type": "anthropic", "base_url": url, "api_key": PLAIN_KEY, **_NO_RESILIENCE},
            {"name": "gemini-up", "type": "gemini", "base_url": url, "api_key": GEMINI_KEY, **_NO_RESILIENCE},
        ],
        "routes": [{"name": r, "steps": [{"provider": p, "model": "m"}]} for r, p in steps.items()],
    }


def _ask(client: httpx.Client, url: str, route: str, stream: bool, text: str) -> str:
    """One request whose upstream answers with ``text`` (carried in the prompt, so requests can run at once)."""
    r = client.post(url + "/v1/chat/completions", headers={"x-api-key": GATEWAY_KEY, "x-request-id": "req-1"},
                    json={"model": route, "stream": stream, "messages": [{"role": "user", "content": f"<<{text}>>"}]})
    assert r.status_code == 502, r.text
    return r.text


def _planted(request_body: bytes) -> str:
    m = re.search(rb"<<([^<>]*)>>", request_body)
    assert m is not None, request_body[:300]
    return m.group(1).decode()


def _surviving_fill(body: str) -> int:
    """How many filler characters of the upstream's text reached the client (the cut's position)."""
    text = json.loads(body)["error"]["attempts"][0]["error"]
    return max(map(len, re.findall(FILL + "+", text)), default=0)


@pytest.fixture(scope="module")
def gateway() -> Iterator[tuple[Any, MockUpstream]]:
    mock = MockUpstream().start()
    try:
        with run_gateway(_config(mock.url)) as gw:
            yield gw, mock
    finally:
        mock.stop()


def _plant_everywhere(gw: Any, send: Callable[[str], str], after: int = 400, workers: int = 8) -> None:
    """Find where the cut falls (filler only), then plant every key so that the cut splits it at each position."""
    gw.logs.seek(0)
    gw.logs.truncate()  # the gateway serves the whole module: only this test's lines count
    cut = _surviving_fill(send(FILL * (after + 5000)))
    assert cut > 0
    texts = [(name, key, FILL * max(cut - split, 0) + key + FILL * after)
             for name, key in KEYS.items() for split in range(1, len(key))]
    with ThreadPoolExecutor(workers) as pool:
        bodies = list(pool.map(send, [t for _, _, t in texts]))
    for (name, key, text), body in zip(texts, bodies, strict=True):
        assert leaked(body, key) is None, (name, text.count(FILL), body)
    logs = gw.logs.getvalue()
    for key in KEYS.values():
        bad = leaked(logs, key)
        assert bad is None, logs[max(logs.index(bad) - 300, 0):logs.index(bad) + 100]


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_key_split_by_any_cut_never_leaks(gateway: tuple[Any, MockUpstream], case: str) -> None:
    gw, mock = gateway
    c = CASES[case]
    mock.default = lambda rec: c.reply(_planted(rec.body))  # type: ignore[assignment]
    with httpx.Client(timeout=10) as client:
        _plant_everywhere(gw, lambda text: _ask(client, gw.url, c.route, c.stream, text))


# -- bad status and header lines: the upstream client's own messages quote the upstream's bytes ----

class RawUpstream:
    """Answers every request with fixed bytes and closes: for answers that are not HTTP at all."""

    def __init__(self) -> None:
        self.answer: Callable[[bytes], bytes] = lambda body: b""  # the request's body -> the answer
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    part = conn.recv(65536)
                    if not part:
                        break
                    data += part
                head, _, body = data.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(body) < length:
                    part = conn.recv(65536)
                    if not part:
                        break
                    body += part
                conn.sendall(self.answer(body))

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() that close() alone leaves blocked
        except OSError:
            pass
        self.sock.close()
        self._thread.join(5)


@pytest.mark.parametrize("where", ["status line", "header line"])
def test_a_key_split_in_a_bad_status_or_header_line_never_leaks(where: str) -> None:
    raw = RawUpstream()
    try:
        with run_gateway(_config(raw.url)) as gw, httpx.Client(timeout=10) as client:
            if where == "status line":
                raw.answer = lambda b: f"HTTX/1.1 200 {_planted(b)}\r\ncontent-length: 0\r\n\r\n".encode()
            else:
                raw.answer = lambda b: f"HTTP/1.1 200 OK\r\n{_planted(b)}\r\ncontent-length: 0\r\n\r\n".encode()

            def send(text: str) -> str:
                return _ask(client, gw.url, "oa", False, text)

            _plant_everywhere(gw, send, after=50)
    finally:
        raw.close()


def test_a_key_split_in_a_token_endpoints_answer_never_leaks(tmp_path: Any) -> None:
    """Vertex quotes its token endpoint's answer when it is not a token: the same rule holds there."""
    creds = tmp_path / "adc.json"
    creds.write_text(json.dumps({"type": "authorized_user", "client_id": "cid", "client_secret": "cs",
                                 "refresh_token": "rt"}))
    raw = RawUpstream()
    current: list[str] = [""]  # the token request carries nothing of the client's: one request at a time
    raw.answer = lambda body: (f"HTTP/1.1 500 Oops\r\ncontent-length: {len(current[0])}\r\n\r\n{current[0]}"
                               .encode())
    cfg = _config(raw.url)
    cfg["providers"].append({"name": "vertex-up", "type": "vertex", "project": "p", "base_url": raw.url,
                             "credentials_file": str(creds), "token_url": raw.url + "/token", **_NO_RESILIENCE})
    cfg["routes"].append({"name": "vx", "steps": [{"provider": "vertex-up", "model": "gemini-2.5-flash"}]})
    try:
        with run_gateway(cfg) as gw, httpx.Client(timeout=10) as client:
            def send(text: str) -> str:
                current[0] = text
                return _ask(client, gw.url, "vx", False, "-")

            _plant_everywhere(gw, send, workers=1)
    finally:
        raw.close()


def test_a_logged_request_body_never_leaks_a_key_its_cut_splits(gateway: tuple[Any, MockUpstream]) -> None:
    """``log_bodies`` logs the first 4 KiB of a client's body: a key that the 4 KiB split stays unseen too."""
    _, mock = gateway
    cfg = _config(mock.url)
    cfg["log_bodies"] = True
    cfg["routes"].append({"name": "demo", "steps": [{"provider": "echo", "model": "e"}]})
    cfg["providers"].append({"name": "echo", "type": "echo"})
    head = '{"model":"demo","messages":[{"role":"user","content":"'
    with run_gateway(cfg) as gw, httpx.Client(timeout=10) as client:
        for key in KEYS.values():
            for split in range(1, len(key)):
                body = head + FILL * (4096 - len(head) - split) + key + FILL * 100 + '"}]}'
                r = client.post(gw.url + "/v1/chat/completions", content=body,
                                headers={"x-api-key": GATEWAY_KEY, "content-type": "application/json",
                                         "x-request-id": "req-1"})
                assert r.status_code == 200
        lines = gw.request_logs(sum(len(k) - 1 for k in KEYS.values()))
        assert all(ln.get("request_body", "").startswith(head) for ln in lines)
        logs = gw.logs.getvalue()
        for key in KEYS.values():
            assert leaked(logs, key) is None
