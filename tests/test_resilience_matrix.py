"""The fault matrix (issue 11): every way an upstream fails, × stream and non-stream, × one key and three.

Each cell runs one request through a real gateway at a real faulty upstream (:mod:`tests.fault_servers`) and
checks what every layer did about it:

* the client's answer: its status and error code (a 502 / 429 / 504 when the route had only the faulty step,
  the always-OK second step's 200 when it had a fall-back), for streams the final event, and never a
  ``[DONE]`` on a stream that broke;
* the attempts: ``x-gateway-attempts``, the error body's (and the request log's) ``attempts`` with their
  ``key`` indices (present only when the provider has several keys), and that nothing was retried, and no
  other step tried, once a first chunk reached the client or the client left;
* the keys: which ones the upstream saw (its ``Authorization``), and which rest afterwards
  (``targets[name].pool.describe(now)``);
* the upstream pool: ``client.stats()["active"]`` back to 0, every broken connection closed by the gateway
  (the upstream's open connections are exactly the ones the pool keeps idle).

Keys and circuits are told the time by a fake clock that never moves (``Services(clock=...)``), so every
cooldown reads exactly what it was set to. Retries use a 10 ms backoff; the only real waits are the timeouts
under test (a 0.5 s step timeout, a 0.3 s ``stream_idle_timeout``).

The faulty provider has ``retries: 2`` (a retried fault makes three attempts), ``cooldown.initial: 2s`` (a
429 without Retry-After rests its key 2 s, and so does the third network error or 5xx in a row) and the
default ``cooldown.failures: 3`` and ``breaker.failures: 5`` (three failures open no circuit).

:data:`BUG_CELLS` are cells that once showed a product bug (the one assertion it broke, at the same
coordinates); they stay as guards.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import math
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from at_gateway.services import Services
from tests.conftest import GATEWAY_KEY, RunningGateway, base_config, run_gateway
from tests.fault_servers import (
    FIRST_EVENT,
    Behaviour,
    FaultServer,
    answer,
    first_chunk_then,
    garbage,
    plain_reply_to_tls,
    refused_port,
    reset_in_body,
    reset_in_head,
    server_context,
    silent,
)
from tests.mock_upstream import MockUpstream, Received, Reply, chat_completion, stream_of, wait_until
from tests.test_tls import self_signed

NOW = 1000.0  # what the fake clock always says
RETRIES = 2
COOLDOWN = 2.0  # cooldown.initial
RETRY_AFTER = 7  # longer than what is left of the step: a single key is not retried after it
SHORT = 0.5  # the step timeout of the cells about timeouts
IDLE = 0.3  # stream_idle_timeout of the stalled-stream cells
KEYS = ("sk-flaky-key-0-aaaaaaaa", "sk-flaky-key-1-bbbbbbbb", "sk-flaky-key-2-cccccccc")
OK_KEY = "sk-ok-key-dddddddddddd"

# What a fault does to a request (for the stream faults it depends on the column):
RETRIED = "retried"  # fails before anything reached the client; retried, each retry on the next key
LIMITED = "rate limited"  # 429: the key rests
TIMED_OUT = "timed out"  # the step's timeout fires: no retry (the timeout spans the retries)
BROKEN = "broken"  # after the first chunk reached the client: an error event, no retry, no fall-through
GONE = "client gone"  # the client left: the upstream request is cancelled, nothing more is tried


@dataclass(frozen=True)
class Fault:
    id: str
    behaviour: Behaviour | None  # None: no HTTP server (refused, or the TLS faults below)
    kind: tuple[str, str]  # (non-stream, stream)
    error: tuple[str, str]  # a fragment of every failed attempt's error (non-stream, stream)
    status: int | None = None  # the upstream status of each failed attempt
    retry_after: int | None = None  # the Retry-After it sends
    timeout: float = 5.0  # the faulty step's timeout
    idle: float = 10.0  # stream_idle_timeout
    tls: str | None = None  # "plain": https at a plain server; "untrusted": a certificate nobody signed
    refused: bool = False
    keeps: bool = False  # an HTTP error answer: the connection may be kept
    leave_after_first: bool = True  # GONE: the client leaves after the stream's first event (else at once)

    def kind_for(self, stream: bool) -> str:
        return self.kind[stream]

    def error_for(self, stream: bool) -> str:
        return self.error[stream]


def _both(value: str) -> tuple[str, str]:
    return value, value


_429 = {"error": {"message": "Rate limit reached for requests", "type": "requests", "code": "rate_limit_exceeded"}}
_500 = {"error": {"message": "The server had an error while processing your request", "type": "server_error"}}

FAULTS = [
    Fault("refused", None, _both(RETRIED), _both("cannot connect to 127.0.0.1:"), refused=True),
    Fault("reset-mid-head", reset_in_head(), _both(RETRIED), _both("upstream closed the connection before answering")),
    Fault("reset-mid-body", reset_in_body(), _both(RETRIED),
          _both("upstream closed the connection before the response ended")),
    Fault("slow-headers", silent(), _both(TIMED_OUT), _both(f"timed out after {SHORT:g}s"), timeout=SHORT),
    Fault("garbage", garbage(), _both(RETRIED), _both("invalid HTTP from upstream")),
    Fault("tls-plain-server", None, _both(RETRIED), _both("TLS handshake with 127.0.0.1:"), tls="plain"),
    Fault("tls-untrusted-cert", None, _both(RETRIED), _both("CERTIFICATE_VERIFY_FAILED"), tls="untrusted"),
    Fault("429-retry-after", answer(429, _429, {"Retry-After": str(RETRY_AFTER)}), _both(LIMITED),
          _both("HTTP 429: Rate limit reached"), status=429, retry_after=RETRY_AFTER, keeps=True),
    Fault("429", answer(429, _429), _both(LIMITED), _both("HTTP 429: Rate limit reached"), status=429, keeps=True),
    Fault("500", answer(500, _500), _both(RETRIED), _both("HTTP 500: The server had an error"), status=500,
          keeps=True),
    Fault("503", answer(503, "<html><body>503 Service Unavailable</body></html>"), _both(RETRIED),
          _both("HTTP 503: <html>"), status=503, keeps=True),
    # In the non-stream column the stream faults are a chunked JSON answer whose first chunk came.
    Fault("stream-cut", first_chunk_then("cut"), (RETRIED, BROKEN),
          _both("upstream closed the connection before the response ended")),
    Fault("stream-stalled", first_chunk_then("stall"), (TIMED_OUT, BROKEN),
          (f"timed out after {SHORT:g}s", f"no chunk for {IDLE:g}s (stream_idle_timeout)"), timeout=SHORT, idle=IDLE),
    # The client leaves mid-answer (the upstream's head came, its body stalls) / mid-stream (after the first event).
    Fault("client-disconnect", first_chunk_then("stall"), _both(GONE), _both("")),
    # ...and before anything was answered (the upstream has the request and says nothing).
    Fault("client-disconnect-waiting", silent(), _both(GONE), _both(""), leave_after_first=False),
]
BY_ID = {f.id: f for f in FAULTS}


State = tuple[str, float, int, int]  # a key afterwards: (state, cooling_for, failures, consecutive 429s)


@dataclass
class Expected:
    """What one cell must show."""

    attempts: list[tuple[int | None, int | None, str]]  # (key, status, error fragment) of the faulty step's
    sent: list[int]  # the keys the upstream saw, in order
    states: list[State] = field(default_factory=list)  # each key's, afterwards

    def check_states(self, described: list[dict[str, Any]]) -> None:
        got = [(s["state"], s["cooling_for"], s["failures"], s["rate_limited"]) for s in described]
        assert got == self.states, described
        assert all(s["in_flight"] == 0 for s in described), described


def expected(fault: Fault, stream: bool, keys: int) -> Expected:
    """The attempts and key states a fault must leave, from its kind (``retries: 2``, round-robin)."""
    many = keys > 1
    kind, error = fault.kind_for(stream), fault.error_for(stream)
    fresh: State = ("ok", 0.0, 0, 0)
    if kind == RETRIED:
        # Three attempts: one key three times (its third failure in a row cools it), or each of three once.
        attempts = [(i if many else None, fault.status, error) for i in range(RETRIES + 1)]
        sent = [i if many else 0 for i in range(RETRIES + 1)]
        states: list[State] = [("ok", 0.0, 1, 0)] * 3 if many else [("cooling", COOLDOWN, RETRIES + 1, 0)]
        return Expected(attempts, sent, states)
    if kind == LIMITED:
        rest = float(fault.retry_after or COOLDOWN)
        if many:  # each retry on the next key; each key rests
            rested: list[State] = [("cooling", rest, 0, 1)] * 3
            return Expected([(i, 429, error) for i in range(3)], [0, 1, 2], rested)
        # One attempt: a retry would find the one key resting (for the backoff, or for a Retry-After longer
        # than what is left of the step), so the step fails now instead of sleeping for a skipped attempt.
        return Expected([(None, 429, error)], [0], [("cooling", rest, 0, 1)])
    if kind == TIMED_OUT:
        return Expected([(0 if many else None, None, error)], [0], [("ok", 0.0, 1, 0)] + [fresh] * (keys - 1))
    if kind == BROKEN:
        # One attempt, never retried; the break counts as one failure of its key, as the same break before the
        # first chunk would (one failure cools nothing).
        return Expected([(0 if many else None, 200, error)], [0], [("ok", 0.0, 1, 0)] + [fresh] * (keys - 1))
    # GONE: one attempt, cancelled: nothing is held against the key.
    return Expected([(0 if many else None, 200, error)], [0], [fresh] * keys)


def _cells() -> Iterator[Any]:
    for fault in FAULTS:
        for stream in (False, True):
            for keys in (1, 3):
                kind = fault.kind_for(stream)
                # A one-step route shows the client's own error; a fall-back shows the fall-through. A fault
                # after the first chunk, or a client that left, must not fall through: only that is checked.
                for shape in ("fallback",) if kind in (BROKEN, GONE) else ("solo", "fallback"):
                    yield pytest.param(fault, stream, keys, shape, id=cell_id(fault.id, stream, keys, shape))


def cell_id(fault: str, stream: bool, keys: int, shape: str) -> str:
    return f"{fault}-{'stream' if stream else 'json'}-{keys}key-{shape}"


# -- servers ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed(tmp_path_factory.mktemp("matrix-pki"))


def _ok_reply(rec: Received) -> Reply:
    if rec.json.get("stream"):
        return Reply(sse=stream_of("fine"))
    return Reply(body=chat_completion("fine"))


@pytest.fixture
def ok() -> Iterator[MockUpstream]:
    """The always-OK provider of the fall-back step."""
    mock = MockUpstream()
    mock.replies["ok-model"] = _ok_reply
    mock.start()
    try:
        yield mock
    finally:
        mock.stop()


@contextmanager
def faulty(fault: Fault, pki: tuple[Path, Path]) -> Iterator[tuple[str, FaultServer | None]]:
    """The faulty upstream's base URL, and its server (None for a refused port)."""
    if fault.refused:
        sock = refused_port()
        try:
            yield f"http://127.0.0.1:{sock.getsockname()[1]}", None
        finally:
            sock.close()
        return
    if fault.tls == "plain":
        server = FaultServer(raw=plain_reply_to_tls)
    elif fault.tls == "untrusted":
        server = FaultServer(tls=server_context(str(pki[0]), str(pki[1])))
    else:
        server = FaultServer(fault.behaviour)
    with server:
        yield server.url, server


def flaky_provider(url: str, keys: int, **extra: Any) -> dict[str, Any]:
    flaky: dict[str, Any] = {"name": "flaky", "type": "openai", "base_url": url, "retries": RETRIES,
                             "retry_backoff": "10ms", "retry_backoff_max": "20ms",
                             "cooldown": {"initial": f"{COOLDOWN:g}s", "max": "60s"}, **extra}
    if keys == 1:
        flaky["api_key"] = KEYS[0]
    else:
        flaky["api_keys"] = list(KEYS[:keys])
    return flaky


def gateway_config(url: str, ok_url: str, fault: Fault, keys: int, **extra: Any) -> dict[str, Any]:
    step = {"provider": "flaky", "model": "m", "timeout": f"{fault.timeout:g}s"}
    routes = [{"name": "solo", "steps": [step]},
              {"name": "fallback", "steps": [step, {"provider": "ok", "model": "ok-model"}]}]
    cfg = base_config(ok_url, routes, stream_keepalive_interval=0, stream_idle_timeout=f"{fault.idle:g}s")
    cfg["providers"] = [flaky_provider(url, keys, **extra),
                        {"name": "ok", "type": "openai", "base_url": ok_url, "api_key": OK_KEY}]
    return cfg


async def _fake_clock(config: Any) -> Services:
    return Services(clock=lambda: NOW)


# -- the client ---------------------------------------------------------------------------------------------------
def _body(route: str, stream: bool) -> bytes:
    return json.dumps({"model": route, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}).encode()


def _request(route: str, stream: bool) -> bytes:
    body = _body(route, stream)
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nX-Api-Key: "
            + GATEWAY_KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)


def post(gw: RunningGateway, route: str, stream: bool) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=15)
    try:
        conn.request("POST", "/v1/chat/completions", _body(route, stream),
                     {"x-api-key": GATEWAY_KEY, "content-type": "application/json"})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def open_stream(gw: RunningGateway, route: str) -> tuple[socket.socket, bytes]:
    """A stream request on a raw socket, read up to its first event; the caller closes the socket."""
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=15)
    s.sendall(_request(route, True))
    got = b""
    while b"data: " not in got:
        data = s.recv(65536)
        if not data:
            s.close()
            raise AssertionError(f"the stream ended before its first event: {got!r}")
        got += data
    return s, got


def leave_midway(gw: RunningGateway, route: str, stream: bool, server: FaultServer, after_first: bool) -> None:
    """Send the request and close the connection mid-answer: once the stream's first event arrived
    (``after_first``, streams), else once the upstream has the request."""
    if stream and after_first:
        s, got = open_stream(gw, route)
        assert got.startswith(b"HTTP/1.1 200 "), got
        s.close()
        return
    with socket.create_connection(("127.0.0.1", gw.port), timeout=15) as s:
        s.sendall(_request(route, stream))
        assert wait_until(lambda: len(server.seen) == 1)


def events(body: bytes) -> list[bytes]:
    return [e + b"\n\n" for e in body.split(b"\n\n") if e.strip()]


def _check_attempts(listed: list[dict[str, Any]], exp: list[tuple[int | None, int | None, str]], keys: int) -> None:
    """The faulty step's attempts, as the 502 body and the request log list them."""
    assert [(a.get("key"), a["status"]) for a in listed] == [(k, s) for k, s, _ in exp], listed
    for a, (_, _, fragment) in zip(listed, exp, strict=True):
        assert (a["step"], a["provider"], a["model"]) == (0, "flaky", "m")
        assert ("key" in a) == (keys > 1)  # an index only when there is a choice of keys
        assert fragment in (a["error"] or ""), a


@dataclass
class Cell:
    """One cell, run: the gateway (still up), the faulty upstream, and what the client got."""

    fault: Fault
    stream: bool
    keys: int
    shape: str
    gw: RunningGateway
    url: str
    server: FaultServer | None
    ok: MockUpstream
    status: int | None = None  # None: the client left
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    @property
    def kind(self) -> str:
        return self.fault.kind_for(self.stream)

    def states(self) -> list[dict[str, Any]]:
        pool = self.gw.gateway.targets["flaky"].pool
        assert pool is not None
        return pool.describe(NOW)

    def idle_upstream(self) -> int:
        """Connections to the faulty upstream the gateway's pool keeps idle."""
        client = self.gw.gateway.client
        return len(client.pool(client.target(self.url).origin).idle)


@contextmanager
def run_cell(fault: Fault, stream: bool, keys: int, shape: str, pki: tuple[Path, Path], ok: MockUpstream,
             **provider: Any) -> Iterator[Cell]:
    with faulty(fault, pki) as (url, server), run_gateway(gateway_config(url, ok.url, fault, keys, **provider),
                                                           services=_fake_clock) as gw:
        cell = Cell(fault, stream, keys, shape, gw, url, server, ok)
        if cell.kind == GONE:
            assert server is not None
            leave_midway(gw, shape, stream, server, fault.leave_after_first)
            # The gateway cancelled the upstream request: it closed that connection.
            assert wait_until(lambda: server.peer_closed == 1), "the upstream request outlived its client"
        else:
            cell.status, cell.headers, cell.body = post(gw, shape, stream)
        yield cell


# -- the matrix ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("fault", "stream", "keys", "shape"), list(_cells()))
def test_fault_matrix(fault: Fault, stream: bool, keys: int, shape: str, pki: tuple[Path, Path],
                      ok: MockUpstream) -> None:
    exp = expected(fault, stream, keys)
    kind = fault.kind_for(stream)
    fell_through = shape == "fallback" and kind in (RETRIED, LIMITED, TIMED_OUT)
    n_attempts = len(exp.attempts) + (1 if fell_through else 0)
    with run_cell(fault, stream, keys, shape, pki, ok) as cell:
        status, headers, body, gw, server = cell.status, cell.headers, cell.body, cell.gw, cell.server

        # -- the client's answer
        outcome: int | None = None
        if fell_through:
            assert status == 200, body
            assert headers["x-gateway-provider"] == "ok"
            if stream:
                assert body.endswith(b"data: [DONE]\n\n") and b"fine" in body, body
            else:
                assert json.loads(body)["choices"][0]["message"]["content"] == "fine"
        elif kind == BROKEN:
            assert status == 200 and headers["content-type"] == "text/event-stream"
            evs = events(body)
            assert evs[0] == FIRST_EVENT, evs  # the first chunk reached the client...
            assert b"[DONE]" not in body  # ...and the stream never looks finished
            last = json.loads(evs[-1][len(b"data: "):])["error"]
            outcome = 504 if fault.id == "stream-stalled" else 502
            assert (last["code"], last["status"]) == ("stream_interrupted", outcome), last
            assert fault.error_for(stream) in last["message"], last
        elif kind != GONE:
            err = json.loads(body)["error"]
            wait = math.ceil(fault.retry_after or COOLDOWN)
            if kind == LIMITED:
                assert (status, err["code"]) == (429, "upstream_rate_limited"), body
                assert headers["retry-after"] == str(wait)
                assert f"every step of route 'solo' is rate limited upstream; retry in {wait}s" in err["message"]
            elif kind == TIMED_OUT:
                assert (status, err["code"]) == (504, "all_steps_timed_out"), body
                assert err["message"] == "all 1 step(s) of route 'solo' timed out"  # one attempt: no "after"
            else:
                assert (status, err["code"], err["type"]) == (502, "all_steps_failed", "upstream_error"), body
                # The steps, and the attempts the retries made of them.
                assert err["message"].startswith("all 1 step(s) of route 'solo' failed after 3 attempts"), err
            _check_attempts(err["attempts"], exp.attempts, keys)
        if kind != GONE:
            assert headers["x-gateway-attempts"] == str(n_attempts)
        assert len(ok.received) == (1 if fell_through else 0)  # the fall-back step ran only when it had to

        # -- the request log: the client's status, every attempt, the failed ones with their keys
        (line,) = gw.request_logs(1)
        assert line["attempts"] == n_attempts, line
        if kind == GONE:
            assert line["status"] == (200 if stream and fault.leave_after_first else 499), line
            assert line["error"] == "client disconnected before the response ended", line
        elif kind == BROKEN:
            assert (line["status"], line["outcome"]) == (200, outcome), line
        else:
            assert line["status"] == status
            _check_attempts(line["failed_attempts"][:len(exp.attempts)], exp.attempts, keys)

        # -- the keys: which went out, which rest
        if server is not None and fault.behaviour is not None:
            assert server.keys_used == [KEYS[i] for i in exp.sent]
        elif server is not None:  # TLS: every attempt opened a connection whose handshake failed
            assert server.seen == [] and wait_until(lambda: server.connections == len(exp.attempts))
        exp.check_states(cell.states())

        # -- nothing leaked: the pool's connections are all back; the upstream's open connections are exactly
        # the ones the pool keeps idle (after a whole error answer), a broken one is closed
        assert wait_until(lambda: gw.gateway.client.stats()["active"] == 0), gw.gateway.client.stats()
        if server is not None:
            assert wait_until(lambda: server.open == cell.idle_upstream()), (server.open, cell.idle_upstream())
            if not fault.keeps:
                assert cell.idle_upstream() == 0
        everything = body + gw.logs.getvalue().encode()
        assert not any(k.encode() in everything for k in KEYS), "a provider key leaked"
        assert b"Traceback" not in everything


def test_matrix_covers_every_fault_of_the_issue() -> None:
    """The rows the issue lists, each in both columns and with one key and three."""
    assert len(BY_ID) == len(FAULTS)
    cells = list(_cells())
    assert len({(c.values[0].id, c.values[1], c.values[2]) for c in cells}) == len(FAULTS) * 4
    for needed in ("refused", "reset-mid-head", "reset-mid-body", "slow-headers", "garbage", "tls-plain-server",
                   "429-retry-after", "429", "500", "503", "stream-cut", "stream-stalled", "client-disconnect"):
        assert needed in BY_ID


# -- cells that show a product bug ----------------------------------------------------------------------------------
def _reuses_its_connection(cell: Cell) -> None:
    # Every retry went over the connection the first error answer (read to its end, keep-alive) left.
    assert cell.server is not None
    assert cell.server.connections == 1, f"{cell.server.connections} connections for {len(cell.server.seen)} requests"


# Were bugs (an error answer's connection was closed, not pooled: each retry opened a new one); now guards.
BUG_CELLS = [
    pytest.param("429", False, 3, "solo", _reuses_its_connection, id="429-json-3key-solo-connection-reused"),
    pytest.param("500", True, 1, "solo", _reuses_its_connection, id="500-stream-1key-solo-connection-reused"),
]


@pytest.mark.parametrize(("fault_id", "stream", "keys", "shape", "check"), BUG_CELLS)
def test_fault_matrix_bug_cells(fault_id: str, stream: bool, keys: int, shape: str, check: Callable[[Cell], None],
                                pki: tuple[Path, Path], ok: MockUpstream) -> None:
    with run_cell(BY_ID[fault_id], stream, keys, shape, pki, ok) as cell:
        assert wait_until(lambda: cell.gw.gateway.client.stats()["active"] == 0)
        check(cell)


# -- a stream is in flight until it ends: its key (least-busy) and its slot (max_concurrency) ------------------------
def test_least_busy_counts_a_stream_until_it_ends(pki: tuple[Path, Path], ok: MockUpstream) -> None:
    """Two streams at once with ``key_strategy: least-busy``: the second goes to a key the first is not using."""
    fault = BY_ID["client-disconnect"]  # first chunk, then silence: a stream that stays open
    with faulty(fault, pki) as (url, server), run_gateway(
            gateway_config(url, ok.url, fault, 3, key_strategy="least-busy"), services=_fake_clock) as gw:
        assert server is not None
        first, _ = open_stream(gw, "solo")
        try:
            second, _ = open_stream(gw, "solo")
            second.close()
        finally:
            first.close()
        assert wait_until(lambda: server.peer_closed == 2)
        assert server.keys_used == [KEYS[0], KEYS[1]], server.keys_used


def test_max_concurrency_holds_its_slot_for_a_whole_stream(pki: tuple[Path, Path], ok: MockUpstream) -> None:
    """``max_concurrency: 1`` with a stream open: the next request waits ``queue_timeout`` for the slot and falls
    through to the next step, without reaching the busy provider."""
    fault = dataclasses.replace(BY_ID["client-disconnect"], timeout=SHORT)  # (as it is, the second times out)
    with faulty(fault, pki) as (url, server), run_gateway(
            gateway_config(url, ok.url, fault, 1, max_concurrency=1, queue_timeout="0.2s"),
            services=_fake_clock) as gw:
        assert server is not None
        first, _ = open_stream(gw, "solo")
        try:
            status, headers, _ = post(gw, "fallback", False)
        finally:
            first.close()
        assert wait_until(lambda: server.open == 0)
        assert len(server.seen) == 1, "the second request reached a provider at max_concurrency"
        assert (status, headers["x-gateway-provider"]) == (200, "ok")
